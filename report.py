"""report.py: predictions and their gold split as one self-contained HTML page to read errors in (CSS and script
inline, nothing fetched from the network): the score tables at the top, then every sentence with its gold and
predicted entities highlighted by type, nesting visible, each error marked with its kind (breakdown.py's
taxonomy), filters by error kind, type and seen/unseen, and a search box. For speech, each utterance has a play
button (one shared player; the wav is linked relative to the page, or embedded with audio="embed"), and an entity
with a time (decode.py --timestamps; the demo corpus's gold times) plays just its interval when clicked. The page's
address can carry the filters: report.html#kind=missed&type=PER&seen=unseen&q=北京.

    python evaluate.py report --predictions P.jsonl --dataset D --data-dir X --split S --out report.html

render() builds the page from breakdown.compare's sentences; evaluate.py reads the files and writes it.
"""
from __future__ import annotations

import base64
import html
import os
import urllib.parse
from pathlib import Path

from breakdown import KINDS, SIDE_KINDS
from text import TYPES

AUDIO_MODES = ("link", "embed", "none")
KIND_TEXT = {"correct": "correct", "wrong_type": "wrong type", "misheard": "misheard", "overlap": "boundary",
             "missed": "missed", "spurious": "spurious"}

CSS = """
body{font:15px/1.5 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em;margin:0 0 .3em} h2{font-size:1.05em;margin:1.2em 0 .4em} .meta{color:#555}
table{border-collapse:collapse;margin:.3em 1.5em .8em 0;display:inline-table;vertical-align:top}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right} th:first-child,td:first-child{text-align:left}
td.pick{cursor:pointer;text-decoration:underline dotted}
#bar{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ddd;z-index:2}
#bar select,#bar input{margin-right:.8em;font-size:14px} #shown{color:#555}
.s{border-bottom:1px solid #eee;padding:.35em 0} .s[hidden]{display:none}
.id{color:#888;font-size:12px;margin-right:.5em} .play{font-size:12px;cursor:pointer;margin-right:.4em}
.line{margin:.1em 0} .side{display:inline-block;width:3.2em;color:#888;font-size:12px}
.e,.key{border:2px solid;border-radius:3px;padding:1px 2px;margin:0 1px;cursor:default}
.e::after,.ec::after,.key::after{content:attr(data-l);font-size:10px;vertical-align:super;margin-left:2px;color:#444}
.ec{border:2px dashed;padding:1px 2px}
.PER{border-color:#2f6fd0;background:rgba(47,111,208,.10)} .LOC{border-color:#2a9a4a;background:rgba(42,154,74,.10)}
.ORG{border-color:#d07a1f;background:rgba(208,122,31,.10)}
.wrong_type,.misheard,.overlap,.missed,.spurious{outline:2px dotted #c0282d;outline-offset:1px}
.missed,.spurious{background:rgba(192,40,45,.12)}
.e[data-t0]{cursor:pointer} .unplaced{font-style:italic}
"""

CATCH = "window.onerror=function(m){document.documentElement.setAttribute('data-script-error',String(m));};"

SCRIPT = r"""
(function(){
var rows=[].slice.call(document.querySelectorAll('.s')),kind=document.getElementById('kind'),
type=document.getElementById('type'),seen=document.getElementById('seen')||{value:'all',addEventListener:function(){}},
q=document.getElementById('q'),
shown=document.getElementById('shown'),player=document.getElementById('player'),stopAt=null;
function apply(){var k=kind.value,t=type.value,v=seen.value,s=q.value.trim(),n=0;
 rows.forEach(function(r){var ok=r.getAttribute('data-m').split(' ').some(function(m){var p=m.split('.');
  return (k==='all'||(k==='error'?p[0]!=='correct':p[0]===k))&&(t==='all'||p[1]===t)&&(v==='all'||p[2]===v);});
  if(k==='all'&&t==='all'&&v==='all')ok=true;
  if(ok&&s)ok=r.textContent.indexOf(s)>=0;r.hidden=!ok;n+=ok;});
 shown.textContent=n+' of '+rows.length+' sentences';}
[kind,type,seen].forEach(function(e){e.addEventListener('change',apply);});q.addEventListener('input',apply);
document.querySelectorAll('td.pick').forEach(function(c){c.addEventListener('click',function(){
 kind.value=c.getAttribute('data-kind');apply();});});
function play(src,t0,t1){if(!player)return;if(player.getAttribute('src')!==src)player.src=src;
 player.setAttribute('data-interval',(t0||0)+'-'+(t1===null?'':t1));
 var go=function(){player.currentTime=t0||0;stopAt=t1;player.play();};
 if(player.readyState>0)go();else player.addEventListener('loadedmetadata',go,{once:true});}
if(player)player.addEventListener('timeupdate',function(){if(stopAt!==null&&player.currentTime>=stopAt){
 player.pause();stopAt=null;}});
document.addEventListener('click',function(ev){var b=ev.target.closest('.play,[data-t0]');if(!b)return;
 var r=b.closest('.s');if(!r||!r.getAttribute('data-src'))return;
 if(b.classList.contains('play'))play(r.getAttribute('data-src'),0,null);
 else play(r.getAttribute('data-src'),parseFloat(b.getAttribute('data-t0')),parseFloat(b.getAttribute('data-t1')));});
location.hash.replace(/^#/,'').split('&').forEach(function(kv){var at=kv.indexOf('=');if(at<0)return;
 var e=document.getElementById(kv.slice(0,at)),v=kv.slice(at+1).replace(/\+/g,' ');
 try{v=decodeURIComponent(v);}catch(err){}
 if(e)e.value=v;});
apply();
window.addEventListener('load',function(){document.body.setAttribute('data-load-ms',
 String(Math.round(performance.now())));});
document.body.setAttribute('data-ready','1');
})();
"""


def _span_open(mark, side, times, confidence, first=True) -> str:
    """The opening tag of one entity's span (first piece: class e; later pieces of a crossing entity: ec)."""
    e, kind = mark.entity, mark.kind
    label = e.type if kind == "correct" else f"{e.type} · {KIND_TEXT[kind]}"
    title = [f"{side} {e.type}", KIND_TEXT[kind]]
    if mark.seen is not None:
        title.append("seen in training" if mark.seen else "unseen in training")
    if confidence is not None:
        title.append(f"confidence {confidence:.2f}")
    attrs = f' class="{"e" if first else "ec"} {e.type} {kind}" data-l="{html.escape(label)}"'
    if times is not None and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in times[:2]):
        attrs += f' data-t0="{times[0]:.3f}" data-t1="{times[1]:.3f}"'
        title.append(f"{times[0]:.2f}-{times[1]:.2f} s (click to play)")
    return f'<span{attrs} title="{html.escape(" · ".join(title))}">'


def entity_html(text: str, marks, side: str, times=None, confidences=None) -> str:
    """text with every placed mark wrapped in a span, nested as the entities nest; an entity that crosses another
    is closed and reopened (its later pieces are class ec, so .e counts each entity once); an empty entity is an
    empty span at its place; unplaced predictions follow the text in italics."""
    times = times or [None] * len(marks)
    confidences = confidences or [None] * len(marks)
    placed = [i for i, m in enumerate(marks) if m.entity.start is not None]
    cuts = sorted({0, len(text), *(marks[i].entity.start for i in placed), *(marks[i].entity.end for i in placed)})
    outer_first = sorted(placed, key=lambda i: (marks[i].entity.start, -marks[i].entity.end, i))
    out, stack, opened = [], [], set()
    for a, b in zip(cuts, cuts[1:] + [None]):
        for i in outer_first:                            # empty entities sit at their place, inside what covers it
            if marks[i].entity.start == marks[i].entity.end == a and i not in opened:
                opened.add(i)
                out.append(_span_open(marks[i], side, times[i], confidences[i]) + "</span>")
        if b is None:
            break
        want = [i for i in outer_first if marks[i].entity.start <= a and b <= marks[i].entity.end
                and marks[i].entity.start < marks[i].entity.end]
        keep = 0
        while keep < len(stack) and keep < len(want) and stack[keep] == want[keep]:
            keep += 1
        out.append("</span>" * (len(stack) - keep))
        for i in want[keep:]:
            out.append(_span_open(marks[i], side, times[i], confidences[i], first=i not in opened))
            opened.add(i)
        stack = want
        out.append(html.escape(text[a:b]))
    out.append("</span>" * len(stack))
    for i, m in enumerate(marks):
        if m.entity.start is None:
            out.append(" " + _span_open(m, side, times[i], confidences[i]).replace('" data-l=', ' unplaced" data-l=', 1)
                       + "(not placed in the text)</span>")
    return "".join(out)


def _audio_src(wav, out_dir: Path, mode: str) -> str | None:
    if not wav or mode == "none":
        return None
    if mode == "embed":
        return "data:audio/wav;base64," + base64.b64encode(Path(wav).read_bytes()).decode("ascii")
    return urllib.parse.quote(Path(os.path.relpath(Path(wav).resolve(), out_dir.resolve())).as_posix())


def sentence_html(s, out_dir: Path, audio: str) -> str:
    """One sentence: id, play button, its gold line and its predicted line."""
    r = s.record or {}
    pred_times = [(e.get("start_s"), e.get("end_s")) for e in r.get("entities", [])]
    confidences = [e.get("confidence") for e in r.get("entities", [])]
    if len(pred_times) != len(s.pred):
        pred_times, confidences = None, None
    src = _audio_src(r.get("wav") or s.sample.audio, out_dir, audio) if s.task != "TNER" else None
    if not src:                                          # nothing to play: no time is offered
        pred_times = None
    tokens = {f"{m.kind}.{m.entity.type}.{'-' if m.seen is None else 'seen' if m.seen else 'unseen'}"
              for m in s.gold + s.pred}
    head = f'<span class="id">{html.escape(s.sample.id)}</span>'
    if src:
        head += '<button class="play" title="play the utterance">&#9654;</button>'
    said = "heard" if s.task == "SNER" else "pred"
    return (f'<div class="s" data-m="{" ".join(sorted(tokens)) or "none"}"'
            + (f' data-src="{html.escape(src)}"' if src else "") + ">" + head
            + '<div class="line"><span class="side">gold</span>'
            + entity_html(s.sample.text, s.gold, "gold", s.sample.times if src else None) + "</div>"
            + f'<div class="line"><span class="side">{said}</span>'
            + entity_html(s.text, s.pred, said, pred_times, confidences) + "</div></div>")


def _table(head, rows) -> str:
    return ("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(cell if cell.startswith("<td") else f"<td>{cell}</td>" for cell in row)
                      + "</tr>" for row in rows) + "</table>")


def tables_html(result: dict) -> str:
    """The score tables: P/R/F1 per type, nesting, seen/unseen, errors by kind (a count filters the sentences)."""
    parts = [_table(["", "P", "R", "F1", "gold", "pred", "correct"],
                    [[name, f"{m['p']:.2f}", f"{m['r']:.2f}", f"<b>{m['f1']:.2f}</b>", str(m["gold"]),
                      str(m["pred"]), str(m["tp"])] for name, m in [("all", result), *result["per_type"].items()]])]
    for table in ("nesting", "seen"):
        if table in result:
            parts.append(_table([table, "R", "gold", "found", "P", "pred", "correct"],
                                [[cls, f"{m['r']:.2f}", str(m["gold"]), str(m["found"]), f"{m['p']:.2f}",
                                  str(m["pred"]), str(m["correct"])] for cls, m in result[table].items()]))
    rows = []
    for side, label in (("gold", "gold not found"), ("pred", "wrong predictions")):
        rows.append([label] + [f'<td class="pick" data-kind="{k}">{result["errors"][side][k]}</td>'
                               if k in SIDE_KINDS[side] else "" for k in KINDS])
    parts.append(_table(["errors"] + [KIND_TEXT[k] for k in KINDS], rows))
    return "".join(parts)


def render(sentences, info: dict, result: dict, out_path, audio: str = "link", title: str | None = None) -> str:
    """The whole page. sentences: breakdown.compare's; info: what was compared (evaluate.compare_file); result:
    breakdown.tables of the same sentences; out_path: where the page will be written (wav links are relative to
    it); audio: link | embed | none."""
    if audio not in AUDIO_MODES:
        raise ValueError(f"audio must be one of {', '.join(AUDIO_MODES)}, got {audio!r}")
    out_dir = Path(out_path).parent
    speech = any(s.task != "TNER" for s in sentences)
    title = title or f"{info['task']} on {info['dataset']} {info['split']}: {Path(info['predictions']).name}"
    meta = (f"{len(sentences)} sentences ({info['sentences_without_prediction']} of the split without a prediction)"
            f" · gold {html.escape(str(info.get('file', '')))} · predictions {html.escape(info['predictions'])}"
            + (f" · seen/unseen against {html.escape(info['seen_from'])}" if info.get("seen_from") else ""))

    def options(values):
        return "".join(f'<option value="{v}">{html.escape(t)}</option>' for v, t in values)

    kinds = [("all", "all"), ("error", "any error")] + [(k, KIND_TEXT[k]) for k in ("correct", *KINDS)]
    seen_filter = (f'training <select id="seen">{options([(v, v) for v in ("all", "seen", "unseen")])}</select>'
                   if info.get("seen_from") else "")
    bar = (f'<div id="bar">kind <select id="kind">{options(kinds)}</select>'
           f'type <select id="type">{options([("all", "all")] + [(t, t) for t in TYPES])}</select>' + seen_filter
           + '<input id="q" type="search" placeholder="search text or id"> <span id="shown"></span>'
           + ('<br><audio id="player" controls></audio>' if speech and audio != "none" else "")
           + "</div>")
    legend = ("<p class='meta'>Entities: " + " ".join(f'<span class="key {t}">{t}</span>'
                                                       for t in TYPES)
              + " · a dotted red outline marks an error, its kind after the type (wrong type, misheard: the "
                "transcription differs inside the entity, boundary: another extent overlaps, missed, spurious) · "
                "dashed: the rest of an entity that crosses another" + (" · click an entity with a time to hear it"
                                                                         if speech else "") + "</p>")
    body = "\n".join(sentence_html(s, out_dir, audio) for s in sentences)
    return ("<!DOCTYPE html><html lang='zh'><head><meta charset='utf-8'><title>" + html.escape(title)
            + f"</title><script>{CATCH}</script><style>{CSS}</style></head>"
            + f"<body><h1>{html.escape(title)}</h1><p class='meta'>{meta}</p>"
            + tables_html(result) + legend + bar + f'<div id="rows">\n{body}\n</div>'
            + f"<script>{SCRIPT}</script></body></html>\n")

