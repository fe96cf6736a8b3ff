"""
Demo corpus: short invented Mandarin news/daily-life sentences with PER/LOC/ORG entities (nested ones included),
spoken by espeak-ng, in the CNERTA JSON + AISHELL-1 wav layout, so the demo goes through the same loaders as real
data. Generated, never downloaded; deterministic for a seed (same JSON and byte-identical wavs).

    python demo.py                          # builds the default corpus into the cache folder (~1-2 min on 2 cores)
    python demo.py --out /tmp/demo --n-train 200 --n-dev 20 --n-test 20 --no-audio

    from demo import ensure_demo_corpus
    root = ensure_demo_corpus()             # -> ~/.cache/image/demo-v2-seed0 (or $IMAGE_CACHE/demo-v2-seed0)

Layout written (AISHELL-style utterance ids DEMO01SxxxxWyyyy: speaker = id[6:11], as in BAC009S0002W0122):
    train.json valid.json test.json     one JSON object a line: {"sentence", "audio": utt id,
                                        "entity": [[start, end_exclusive, text, TYPE], ...],
                                        "entity_times": [[start_s, end_s], ...] (one per entity; with audio),
                                        "speaker_info": F|M}
    wav/{train,dev,test}/Sxxxx/ID.wav   16 kHz mono 16-bit PCM (absent with audio=False)
    index.jsonl                         per utterance: split, speaker, voice, rate, pitch, pinyin, wav, samples
    meta.json                           seed, counts, entity statistics, tool versions, generation time, sha256s
Speech (synth.py): pypinyin TONE3 syllables (neutral tone 5) -> libespeak-ng voice cmn-latn-pinyin(+variant) at 22.05 kHz ->
sox without dither (-D -R: bit-exact repeatable) -> gain -1 dB (the resampler overshoots otherwise) -> 16 kHz.
Gold entity times (demo-v2): espeak-ng reports the sample where each syllable (= character) starts; an entity's
speech runs from the first to the last non-silent sample (>= -40 dB of the utterance's peak) of its characters'
stretches. The audio is the espeak-ng command's, byte for byte, so no marks or pauses are added: 4,799 of demo-v1's
4,800 wavs come out identical, and the one that does not (the first) is what today's espeak-ng command makes too.
Eight virtual speakers (an espeak variant, a base rate and pitch each) are shared by all splits; every utterance
jitters rate and pitch a little.
"""
import argparse
import hashlib
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import wave
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from synth import check_tools, entity_times, synthesize, to_pinyin, tool_versions

VERSION = "demo-v2"        # bump when the generator changes what it writes (the cache folder is named after it)
DRAWS = "demo-v1"          # seeds the random draws: v2 (+ gold times) has v1's sentences, voices and wavs
DEFAULT_COUNTS = dict(n_train=4000, n_dev=400, n_test=400)
SPLITS = (("train", "train.json", "train"), ("dev", "valid.json", "dev"), ("test", "test.json", "test"))  # (split, json, wav dir)

# ---------------------------------------------------------------------------------------------------------------
# Word lists (written for this project). Given-name characters have pairwise different pinyin, and so do surnames,
# because the speech is synthesised from pinyin: homophones in a name could not be told apart by ear.
SURNAMES = """王 李 张 刘 陈 杨 黄 赵 吴 周 徐 孙 马 朱 胡 郭 何 高 林 罗 郑 梁 谢 宋 唐 许 韩 冯 邓 曹 彭 田 董 袁
潘 蒋 蔡 余 杜 叶 程 苏 魏 吕 丁 沈 姚 卢 姜 崔 钟 谭 陆 汪 范 金 石 廖 贾 夏 韦 方 白 邹 孟 熊 秦 邱 尹 薛 段 雷 侯 龙
史 陶 黎 贺 顾 毛 郝 龚 邵 万 钱 严 武 戴 莫 孔 向 汤""".split()
GIVEN = """伟 芳 敏 静 丽 强 磊 军 勇 艳 杰 娟 涛 明 超 秀 霞 平 刚 英 华 玉 兰 红 鹏 辉 斌 宇 浩 凯 俊 帆 旭 宁 欣 婷 雪 慧
颖 琳 晨 峰 波 博 文 晓 志 建 海 丹 亮 飞 成 佳 梓 轩 睿 涵 怡 思 天 松 梅 瑶 倩 阳 爽 坤 毅 岩 琦 薇 莹 璐 蓉 凤 东 春 秋
琴 昌 正 贵 福 康 安 远 航""".split()

PROVINCES = """河北 山西 辽宁 吉林 黑龙江 江苏 浙江 安徽 福建 江西 山东 河南 湖北 湖南 广东 海南 四川 贵州 云南 陕西
甘肃 青海 台湾 内蒙古 广西 西藏 宁夏 新疆""".split()
CITIES = """北京 上海 天津 重庆 广州 深圳 杭州 南京 武汉 成都 西安 长沙 郑州 济南 青岛 大连 沈阳 哈尔滨 长春 石家庄 太原
合肥 福州 厦门 南昌 南宁 昆明 贵阳 兰州 西宁 银川 拉萨 海口 三亚 苏州 无锡 宁波 温州 佛山 东莞 珠海 汕头 烟台 潍坊 洛阳
开封 桂林 柳州 徐州 扬州 常州 绍兴 嘉兴 金华 泉州 赣州 九江 宜昌 襄阳 岳阳 株洲 湘潭 绵阳 宜宾 遵义 大理 丽江 保定 唐山
邯郸 大同 包头 鞍山 芜湖 淄博 临沂 南通 盐城 镇江 威海 日照 惠州 江门 湛江 肇庆 梅州 韶关 荆州 黄石 十堰 常德 衡阳 郴州
吉安 景德镇 上饶 莆田 宁德 蚌埠 安庆 秦皇岛 承德 廊坊 沧州 张家口 呼和浩特 乌鲁木齐""".split()
DISTRICTS = """浦东 海淀 东城 西城 丰台 徐汇 静安 黄浦 天河 越秀 南山 福田 宝安 江北 渝中 武昌 汉口 鼓楼 玄武 雁塔 碑林
历下 和平 河西 滨江 上城 锦江 武侯 青羊 金牛 思明 集美 龙岗 罗湖 白云 黄埔 江岸 岳麓 高新 新城""".split()
SCENIC = """长江 黄河 珠江 淮河 汉江 嘉陵江 松花江 澜沧江 钱塘江 泰山 华山 黄山 峨眉山 庐山 武夷山 五台山 嵩山 衡山 天山
昆仑山 长白山 西湖 太湖 洞庭湖 鄱阳湖 青海湖 滇池 洱海 千岛湖 故宫 天安门 长城 外滩 鼓浪屿 九寨沟 张家界 颐和园""".split()
COUNTRIES = """中国 美国 日本 韩国 英国 法国 德国 俄罗斯 意大利 西班牙 加拿大 澳大利亚 巴西 印度 新加坡 泰国 越南 埃及
南非 墨西哥 阿根廷 荷兰 瑞士 瑞典 挪威 芬兰 希腊 土耳其 伊朗 巴基斯坦 马来西亚 印度尼西亚 新西兰 葡萄牙 波兰 丹麦
比利时 肯尼亚 智利 古巴 蒙古 老挝 缅甸 菲律宾 以色列""".split()
FOREIGN_CITIES = """纽约 伦敦 巴黎 东京 首尔 柏林 莫斯科 悉尼 罗马 曼谷 大阪 洛杉矶 芝加哥 温哥华 多伦多 迪拜 开罗 雅典
马德里 维也纳""".split()

BRANDS = """华为 腾讯 阿里巴巴 百度 小米 京东 美团 联想 海尔 格力 比亚迪 吉利 万科 伊利 蒙牛 中兴 网易 拼多多 新浪 搜狐
携程 滴滴 顺丰 娃哈哈 海信 安踏 苏宁 国美 大疆 蔚来 科大讯飞 宝钢 青啤 红星""".split()
COMPANY_SUFFIX = "公司 集团 科技公司 股份有限公司".split()
UNIV_SUFFIX = "大学 师范大学 理工大学 科技大学 财经大学 医科大学 农业大学 交通大学 工业大学 外国语大学".split()
UNIV_PLAIN = "清华大学 复旦大学 同济大学 南开大学 人民大学 暨南大学 东南大学 西南大学".split()
UNIV_UNITS = "医学部 法学院 经济学院 计算机学院 附属医院 图书馆 研究生院 历史系 物理系 中文系 新闻学院".split()
CITY_BODIES = """政府 公安局 教育局 气象台 人民法院 人民检察院 文联 作家协会 卫生健康委员会 交通运输局 税务局 图书馆 博物馆
第一中学 实验小学 消防救援支队""".split()
PROVINCE_BODIES = "政府 教育厅 公安厅 高级人民法院 气象局 文化和旅游厅 科技厅".split()
POLICE_UNITS = "交警支队 刑侦支队 禁毒支队 网安支队".split()
HOSPITALS = "人民医院 第一人民医院 中医院 儿童医院 肿瘤医院 中心医院 妇幼保健院".split()
HOSPITAL_PLAIN = "协和医院 华西医院 湘雅医院 瑞金医院 同仁医院".split()
MEDIA_SUFFIX = "日报 晚报 电视台 广播电视台 都市报".split()
NATIONAL = """国务院 外交部 教育部 财政部 商务部 公安部 交通运输部 国家统计局 国家气象局 最高人民法院 最高人民检察院 新华社
人民日报 中央电视台 光明日报 经济日报 全国人大 国家电网 国家博物馆 国家图书馆""".split()
CHINA_BODIES = """人民银行 科学院 足协 证监会 银行 作家协会 红十字会 女排 男篮 移动 联通 电信 邮政 国家足球队 工程院 建设银行
农业银行 工商银行 奥委会""".split()
CLUBS = "北京:国安 上海:申花 广州:恒大 天津:泰达 河南:建业 长春:亚泰 山东:鲁能 浙江:绿城 四川:全兴 大连:实德".split()
TEAM_SUFFIX = "队 男篮 女排 足球队".split()
DISTRICT_BANKS = "发展银行 农商银行".split()

# Filler words (no entities)
TIME = "今天 昨天 明天 上午 下午 近日 日前 本周 上周 去年 今年 周末 最近 晚上".split()
WHO = "我们 他们 孩子们 大家 同学们 老人们 工人们 邻居们 游客们 志愿者们".split()
WHERE = "公园里 学校里 家里 超市 广场上 办公室 图书馆 食堂 操场上 车站".split()
DOING = "散步 看书 开会 聊天 打球 吃饭 排队 休息 唱歌 跳舞 下棋 讨论问题".split()

# Templates: {SLOT}s are filled by the generators below (entities) or the filler lists (no entity).
TEMPLATES = """
{PER}在{CITY}参加了一场会议 | {T}{PER}来到{ORG}调研 | {ORG}{T}发布了最新数据 | {PER}是{UNIV}的老师
{PER}毕业于{UNIV} | {PER}从{CITY}坐火车去{CITY} | {PER}打算下个月去{SCENIC}旅游 | {ORG}与{ORG}签署合作协议
{PER}代表{TEAM}出战 | {TEAM}{T}战胜了{TEAM} | {MEDIA}报道了这条消息 | 据{MEDIA}报道{CITY}将迎来降雨
{PER}被{GOV}依法拘留 | {GOV}通报了一起交通事故 | {PER}在{HOSP}接受治疗 | {HOSP}成功完成一例手术
{COMPANY}在{CITY}开设了新工厂 | {COMPANY}宣布推出新款手机 | {PER}担任{COMPANY}总经理 | {PER}和{PER}是大学同学
{PER}的家乡在{LOC} | {LOC}的游客数量明显增加 | {PER}说{LOC}的冬天很冷 | {COUNTRY}代表团抵达{CITY}
{PER}会见了{COUNTRY}客人 | {ORG}的专家来到{CITY}交流 | {PER}教授在{UNIV}做报告 | 记者从{GOV}获悉
{PER}向{ORG}捐赠了一批图书 | {CITY}的房价{T}有所上涨 | {SCENIC}景区{T}接待了很多游客 | {PER}在{SCENIC}拍了很多照片
{PER}的女儿考上了{UNIV} | {ORG}招聘了一批年轻人 | {PER}医生在{HOSP}工作了十年 | {PER}和妻子搬到了{CITY}
{PER}给{PER}打了一个电话 | {T}{PER}在{ORG}门口等朋友 | {ORG}和{ORG}达成战略合作 | 欢迎{PER}加入{ORG}
{PER}是{LOC}人 | {LOC}和{LOC}之间将开通高铁 | 从{CITY}到{CITY}只需要两个小时 | {PER}在{COUNTRY}留学三年
{COUNTRY}和{COUNTRY}举行会谈 | {ORG}举办了一场讲座 | 记者{PER}从{CITY}发回报道 | {PER}夺得了比赛冠军
{PER}当选{ORG}主席 | {ORG}主席{PER}出席活动 | {PER}在{CITY}开了一家小店 | {TEAM}主教练{PER}表示很满意
{PER}表示{ORG}将继续努力 | 很多市民来到{SCENIC}散步 | {PER}的公司搬到了{CITY} | {PER}笑着说第一次来{CITY}
{ORG}公布了考试成绩 | {PER}正在{ORG}实习 | 我明天要去{CITY}看望{PER} | {PER}在{FCITY}参加国际会议
{COMPANY}在{COUNTRY}设立分公司 | {T}{LOC}发生了轻微地震 | {PER}带着孩子去{SCENIC}玩 | {GOV}开展安全检查
{PER}对{MEDIA}记者说 | {UNIV}{T}举行毕业典礼 | {PER}和{PER}{T}在{CITY}结婚 | {T}{WHO}在{WHERE}{DOING}
{WHO}{T}在{WHERE}{DOING} | {T}的天气非常好 | {WHO}都觉得这家店很好吃 | {T}{WHO}一起去{WHERE}{DOING}
"""
TEMPLATES = [t.strip() for t in TEMPLATES.replace("\n", "|").split("|") if t.strip()]


# ---------------------------------------------------------------------------------------------------------------
# Entity generators. A span is (text, [(start, end_exclusive, type), ...]) with offsets relative to the text.
def span(type_, *parts):
    """Concatenate strings and spans; with type_, the whole is one more entity (outermost)."""
    text, ents = "", []
    for p in parts:
        if isinstance(p, str):
            text += p
        else:
            ents += [(s + len(text), e + len(text), t) for s, e, t in p[1]]
            text += p[0]
    return (text, ents + [(0, len(text), type_)] if type_ else ents)


class Pools:
    """Each word list split once per seed into a seen part and a held-out part (about 12 %) that only dev/test
    may draw from, so the test set has entities the model never saw in training."""

    def __init__(self, seed, holdout=0.12):
        rng = random.Random(f"{DRAWS}/{seed}/holdout")
        self.seen, self.held = {}, {}
        for name, words in [("surname", SURNAMES), ("given", GIVEN), ("province", PROVINCES), ("city", CITIES),
                            ("district", DISTRICTS), ("scenic", SCENIC), ("country", COUNTRIES),
                            ("fcity", FOREIGN_CITIES), ("brand", BRANDS), ("univ_plain", UNIV_PLAIN),
                            ("national", NATIONAL), ("club", CLUBS)]:
            words = list(words)
            rng.shuffle(words)
            k = int(len(words) * holdout) if name not in ("surname", "given") else 0  # names: new combinations
            self.held[name], self.seen[name] = words[:k], words[k:]

    def pick(self, rng, name, split, p_held=0.3):
        if split != "train" and self.held[name] and rng.random() < p_held:
            return rng.choice(self.held[name])
        return rng.choice(self.seen[name])


def gen_per(rng, P, split):
    given = P.pick(rng, "given", split) + (P.pick(rng, "given", split) if rng.random() < 0.6 else "")
    return span("PER", P.pick(rng, "surname", split) + given)


def gen_city(rng, P, split, suffix_p=0.25):
    return span("LOC", P.pick(rng, "city", split) + ("市" if rng.random() < suffix_p else ""))


def gen_province(rng, P, split, suffix_p=0.2):
    return span("LOC", P.pick(rng, "province", split) + ("省" if rng.random() < suffix_p else ""))


def gen_country(rng, P, split):
    return span("LOC", P.pick(rng, "country", split))


def gen_scenic(rng, P, split):
    return span("LOC", P.pick(rng, "scenic", split))


def gen_fcity(rng, P, split):
    return span("LOC", P.pick(rng, "fcity", split))


def weighted(rng, branches):
    """One rng.random() draw picks the first branch whose cumulative cutoff exceeds it; the last is the rest."""
    r = rng.random()
    return next((make for cutoff, make in branches[:-1] if r < cutoff), branches[-1][1])()


def gen_loc(rng, P, split):
    return weighted(rng, [
        (0.35, lambda: gen_city(rng, P, split)),
        (0.50, lambda: gen_province(rng, P, split)),
        (0.65, lambda: gen_country(rng, P, split)),
        (0.78, lambda: gen_scenic(rng, P, split)),
        (0.88, lambda: span("LOC", P.pick(rng, "district", split) + "区")),
        (0.94, lambda: span(None, gen_province(rng, P, split, 0), gen_city(rng, P, split, 0.5))),  # two LOCs
        (1.00, lambda: gen_fcity(rng, P, split))])


def gen_univ(rng, P, split):
    if rng.random() < 0.2:
        univ = span("ORG", P.pick(rng, "univ_plain", split))
    else:
        where = gen_city(rng, P, split, 0) if rng.random() < 0.6 else gen_province(rng, P, split, 0)
        univ = span("ORG", where, rng.choice(UNIV_SUFFIX))
    return span("ORG", univ, rng.choice(UNIV_UNITS)) if rng.random() < 0.25 else univ  # ORG inside ORG


def gen_gov(rng, P, split):
    r = rng.random()
    if r < 0.2:
        return span("ORG", P.pick(rng, "national", split))
    if r < 0.35:
        return span("ORG", gen_province(rng, P, split, 1), rng.choice(PROVINCE_BODIES))
    if r < 0.55:  # <<(X市)公安局>(Y)分局> or <<(X市)公安局>交警支队>
        police = span("ORG", gen_city(rng, P, split, 1), "公安局")
        if rng.random() < 0.5:
            return span("ORG", police, span("LOC", P.pick(rng, "district", split)), "分局")
        return span("ORG", police, rng.choice(POLICE_UNITS))
    return span("ORG", gen_city(rng, P, split, 1), rng.choice(CITY_BODIES))


def gen_hosp(rng, P, split):
    if rng.random() < 0.2:
        return span("ORG", rng.choice(HOSPITAL_PLAIN))
    return span("ORG", gen_city(rng, P, split, 0.4), rng.choice(HOSPITALS))


def gen_media(rng, P, split):
    if rng.random() < 0.3:
        return span("ORG", rng.choice("新华社 人民日报 中央电视台 光明日报 经济日报".split()))
    where = gen_city(rng, P, split, 0) if rng.random() < 0.7 else gen_province(rng, P, split, 0)
    return span("ORG", where, rng.choice(MEDIA_SUFFIX))


def gen_company(rng, P, split):
    r = rng.random()
    if r < 0.1:  # <<华为>研究院>
        return span("ORG", span("ORG", P.pick(rng, "brand", split)), "研究院")
    if r < 0.2:  # <(上海)(浦东)发展银行>
        return span("ORG", gen_city(rng, P, split, 0), span("LOC", P.pick(rng, "district", split)),
                    rng.choice(DISTRICT_BANKS))
    return span("ORG", P.pick(rng, "brand", split) + (rng.choice(COMPANY_SUFFIX) if r < 0.7 else ""))


def gen_team(rng, P, split):
    r = rng.random()
    if r < 0.3:
        city, name = P.pick(rng, "club", split).split(":")
        return span("ORG", span("LOC", city), name)
    if r < 0.5:
        return span("ORG", gen_country(rng, P, split), rng.choice(["队", "国家队", "女排", "男篮"]))
    where = gen_city(rng, P, split, 0) if rng.random() < 0.6 else gen_province(rng, P, split, 0)
    return span("ORG", where, rng.choice(TEAM_SUFFIX))


def gen_org(rng, P, split):
    return weighted(rng, [
        (0.22, lambda: gen_univ(rng, P, split)),
        (0.40, lambda: gen_gov(rng, P, split)),
        (0.50, lambda: gen_hosp(rng, P, split)),
        (0.60, lambda: gen_media(rng, P, split)),
        (0.78, lambda: gen_company(rng, P, split)),
        (0.90, lambda: span("ORG", span("LOC", "中国"), rng.choice(CHINA_BODIES))),  # <(中国)足协>
        (1.00, lambda: gen_team(rng, P, split))])


SLOTS = {"PER": gen_per, "LOC": gen_loc, "ORG": gen_org, "CITY": gen_city, "COUNTRY": gen_country,
         "SCENIC": gen_scenic, "FCITY": gen_fcity, "UNIV": gen_univ, "GOV": gen_gov, "HOSP": gen_hosp,
         "MEDIA": gen_media, "COMPANY": gen_company, "TEAM": gen_team}
FILLERS = {"T": TIME, "WHO": WHO, "WHERE": WHERE, "DOING": DOING}


def fill(template, rng, P, split, slots=None):
    """One sentence from one template -> (text, entities sorted by (start, -end)). slots: generators that replace
    those of SLOTS."""
    slots = {**SLOTS, **(slots or {})}
    parts = []
    for i, piece in enumerate(re.split(r"\{(\w+)\}", template)):
        if i % 2 == 0:
            parts.append(piece)
        elif piece in FILLERS:
            parts.append(rng.choice(FILLERS[piece]))
        else:
            parts.append(slots[piece](rng, P, split))
    text, ents = span(None, *parts)
    return text, sorted(set(ents), key=lambda e: (e[0], -e[1], e[2]))


# Virtual speakers: (espeak variant, gender, base words per minute, base pitch 0-99)
SPEAKERS = [("m1", "M", 185, 40), ("f2", "F", 190, 62), ("m3", "M", 180, 35), ("f1", "F", 195, 58),
            ("m2", "M", 200, 45), ("f3", "F", 180, 66), ("m4", "M", 190, 38), ("f4", "F", 185, 55)]


def make_sentences(seed, n_train, n_dev, n_test, min_chars=8, max_chars=20):
    """-> {split: [record]}; record = sentence, entity, speaker_info + voice settings and utterance id.
    dev/test hold no exact train sentence and only characters that occur in train."""
    P = Pools(seed)
    seen, train_chars, out = set(), set(), {}
    utt_count = [0] * len(SPEAKERS)
    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        rng = random.Random(f"{DRAWS}/{seed}/{split}")
        records = []
        while len(records) < n:
            for attempt in range(1000):
                text, ents = fill(rng.choice(TEMPLATES), rng, P, split)
                # unseen characters are allowed only when train is too small to avoid them
                if min_chars <= len(text) <= max_chars and text not in seen and (
                        split == "train" or set(text) <= train_chars or attempt >= 200):
                    break
            else:
                raise RuntimeError(f"demo: could not draw {n} distinct {split} sentences (got {len(records)})")
            seen.add(text)
            if split == "train":
                train_chars |= set(text)
            k = rng.randrange(len(SPEAKERS))
            variant, gender, rate, pitch = SPEAKERS[k]
            utt_count[k] += 1
            if utt_count[k] > 9999:
                raise ValueError("demo: more than 9999 utterances per speaker; ask for fewer sentences")
            records.append(dict(sentence=text, audio=f"DEMO01S{k + 1:04d}W{utt_count[k]:04d}",
                                entity=[[s, e, text[s:e], t] for s, e, t in ents], speaker_info=gender,
                                voice=variant, rate=rate + rng.randint(-12, 12), pitch=pitch + rng.randint(-6, 6)))
        out[split] = records
    return out


# ---------------------------------------------------------------------------------------------------------------
# Corpus folder
def default_root(seed=0, audio=True, **counts):
    counts = {**DEFAULT_COUNTS, **counts}
    name = f"{VERSION}-seed{seed}"
    if counts != DEFAULT_COUNTS:
        name += "-n{n_train}-{n_dev}-{n_test}".format(**counts)
    if not audio:
        name += "-text"
    cache = os.environ.get("IMAGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "image")
    return Path(cache) / name


def speak(jobs, progress=True, workers=None):
    """Synthesise jobs [(pinyin, voice variant, rate, pitch, wav path)] in parallel. Yields (samples, word start
    seconds) per job, in order."""
    for d in {j[4].parent for j in jobs}:
        d.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm
    # processes, as libespeak-ng has one state per process; spawned, since they fork (the caller may hold
    # torch's threads, which a fork would copy in an unknown state)
    pool = ProcessPoolExecutor(workers or os.cpu_count() or 1, multiprocessing.get_context("spawn"))
    try:
        yield from tqdm(pool.map(synthesize, *zip(*jobs), chunksize=8), total=len(jobs), desc="demo speech",
                        unit="utt", disable=not progress)
    finally:
        pool.shutdown(cancel_futures=True)  # on an error or Ctrl-C, do not synthesise the rest first


def build(out, seed, n_train, n_dev, n_test, audio=True, progress=True, workers=None):
    """Writes a complete corpus into the (new or empty) folder out. Not atomic by itself: see ensure_demo_corpus."""
    t0 = time.time()
    out = Path(out)
    data = make_sentences(seed, n_train, n_dev, n_test)
    index, jobs = [], []
    for split, json_name, wav_dir in SPLITS:
        for r in data[split]:
            wav = f"wav/{wav_dir}/{r['audio'][6:11]}/{r['audio']}.wav"
            index.append(dict(id=r["audio"], split=split, speaker=r["audio"][6:11], gender=r["speaker_info"],
                              voice=f"cmn-latn-pinyin+{r['voice']}", rate=r["rate"], pitch=r["pitch"],
                              wav=wav if audio else None))
            if audio:
                index[-1]["pinyin"] = to_pinyin(r["sentence"])
                jobs.append((index[-1]["pinyin"], r["voice"], r["rate"], r["pitch"], out / wav))
    seconds = {}
    if audio:
        records = [r for split, _, _ in SPLITS for r in data[split]]
        for rec, r, (n, word_seconds) in zip(index, records, speak(jobs, progress, workers)):
            rec["samples"] = n
            r["entity_times"] = entity_times(r["entity"], word_seconds)
            seconds[rec["split"]] = seconds.get(rec["split"], 0) + n / 16000
    keys = ("sentence", "audio", "entity", "entity_times", "speaker_info") if audio else \
        ("sentence", "audio", "entity", "speaker_info")
    for split, json_name, _ in SPLITS:
        (out / json_name).write_text("".join(json.dumps({k: r[k] for k in keys}, ensure_ascii=False) + "\n"
                                             for r in data[split]), encoding="utf-8")
    with open(out / "index.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in index)
    stats = {}
    for split, json_name, _ in SPLITS:
        recs = data[split]
        ents = [e for r in recs for e in r["entity"]]
        stats[split] = {"sentences": len(recs), "file": json_name,
                        "entities": {t: sum(e[3] == t for e in ents) for t in ("PER", "LOC", "ORG")},
                        "nested_sentences": sum(any(a is not b and b[0] <= a[0] and a[1] <= b[1]
                                                    for a in r["entity"] for b in r["entity"]) for r in recs),
                        "chars": sum(len(r["sentence"]) for r in recs),
                        "audio_seconds": round(seconds.get(split, 0.0), 2)}
    meta = {"format": "image-demo-corpus", "version": VERSION, "seed": seed, "audio": audio,
            "counts": {"n_train": n_train, "n_dev": n_dev, "n_test": n_test}, "splits": stats,
            "speakers": [{"speaker": f"S{k + 1:04d}", "voice": f"cmn-latn-pinyin+{v}", "gender": g, "rate": r,
                          "pitch": p} for k, (v, g, r, p) in enumerate(SPEAKERS)],
            "sha256": {j: hashlib.sha256((out / j).read_bytes()).hexdigest() for _, j, _ in SPLITS},
            "tools": tool_versions() if audio else {"python": platform.python_version()},
            "generation_seconds": round(time.time() - t0, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (out / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return meta


def _check_meta(root, seed, audio, counts):
    meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
    want = {"version": VERSION, "seed": seed, "audio": audio, "counts": counts}
    diff = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if diff:
        raise ValueError(f"demo corpus at {root} was built with other settings (found, wanted): {diff}; "
                         f"delete it or choose another folder")
    return root


def ensure_demo_corpus(root=None, seed=0, progress=True, n_train=DEFAULT_COUNTS["n_train"],
                       n_dev=DEFAULT_COUNTS["n_dev"], n_test=DEFAULT_COUNTS["n_test"], audio=True, workers=None):
    """Returns the folder of the demo corpus, generating it first if needed (into root, default: the cache folder
    default_root(...)). Generation happens in a temporary sibling folder renamed into place when complete, so an
    interrupted run never leaves a corpus that looks complete; a complete one has meta.json."""
    counts = dict(n_train=n_train, n_dev=n_dev, n_test=n_test)
    if min(counts.values()) < 1:
        raise ValueError(f"demo corpus: every split needs at least one sentence, got {counts}")
    root = Path(root) if root is not None else default_root(seed, audio, **counts)
    if (root / "meta.json").is_file():
        return _check_meta(root, seed, audio, counts)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"demo corpus: {root} exists but is not a complete demo corpus (no meta.json); "
                              f"delete it or choose another folder")
    if audio:
        check_tools()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        build(tmp, seed, audio=audio, progress=progress, workers=workers, **counts)
        try:
            os.rename(tmp, root)  # atomic; also replaces an empty folder
        except OSError:
            if not (root / "meta.json").is_file():  # not just another process that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _check_meta(root, seed, audio, counts)


def onset_lead(dataset, noise_margin):
    """The --onset-lead-seconds a model trained on `dataset` decodes long recordings with by default (train.py
    writes it into the checkpoint's assets["decoding"]; None: pieces start where the detector puts them). Every
    demo utterance starts on its first syllable (synthesised, no lead-in): a model that never heard anything before
    it derails on a piece that starts with noise, unless --noise-margin gave it noise there (segment.snap_onsets)."""
    return 0.0 if dataset == "demo" and not noise_margin else None


# ----------------------------------------------------------------------------------------------------------------
# Long recordings (#18): demo test utterances joined into minutes of noisy, level-shifted audio

LONG_VERSION = "long-v1"
LONG_MINUTES = (1, 2, 3, 5, 7, 10)
LONG_VALID_MINUTES = (1, 2, 3, 5)   # valid split: for choosing settings (piece padding, thresholds) off the test set
NOISES = ("whitenoise", "pinknoise", "brownnoise")


def _read_pcm16(path):
    with wave.open(str(path), "rb") as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64) / 32768


def _write_pcm16(path, x):
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(np.round(np.clip(x, -1, 32767 / 32768) * 32768).astype("<i2").tobytes())


def build_long_form(root, out, seed=0, minutes=LONG_MINUTES, split="test"):
    """Long recordings made of the demo corpus's `split` utterances (root: a built corpus with audio), into out:

        test.json, wav/test/LONGxxxx.wav   a recording a line, CNERTA format: its utterances' text joined, their
                                           entities and "entity_times" moved into the recording; "utterances":
                                           [{"audio", "start_s", "end_s", "chars": [a, b], "gain_db"}], "snr_db",
                                           "noise" (split valid: valid.json, wav/valid/VLONGxxxx.wav)
        cut/test.json, cut/wav/test/       the same noisy audio cut at the gold utterance boundaries, an utterance a
                                           wav (an utterance used twice gets the suffix rN), its demo line unchanged
    Each recording: utterances in a shuffled order until it is `minutes` long, pauses of 0.1-2 s between them (a
    third under 0.3 s), each utterance's level moved by -12..+12 dB, and noise that sox synthesises (white, pink or
    brown; sox -R: repeatable) at an SNR of 5-30 dB over the speech, scaled down as a whole if it would clip."""
    root, out = Path(root), Path(out)
    if split not in ("test", "valid"):
        raise ValueError(f"long-form split {split!r}: test or valid")
    rng = random.Random(f"{LONG_VERSION}:{seed}" + ("" if split == "test" else f":{split}"))   # test: as before
    lines = [json.loads(x) for x in (root / f"{split}.json").read_text(encoding="utf-8").splitlines() if x.strip()]
    wavs = {p.stem: p for p in (root / "wav" / {"test": "test", "valid": "dev"}[split]).rglob("*.wav")}
    order, used, recordings, cut_lines = [], {}, [], []
    for k, target in enumerate(minutes):
        parts, meta, text, entities, times, t = [], [], "", [], [], 0.0
        while t < target * 60:
            if not order:
                order = rng.sample(range(len(lines)), len(lines))
            line = lines[order.pop()]
            pause = rng.uniform(0.1, 0.3) if rng.random() < 1 / 3 else rng.uniform(0.3, 2.0)
            gain_db = rng.uniform(-12, 12)
            speech = _read_pcm16(wavs[line["audio"]]) * 10 ** (gain_db / 20)
            start = t + pause
            n = used[line["audio"]] = used.get(line["audio"], -1) + 1
            cut_id = line["audio"] + (f"r{n}" if n else "")
            meta.append({"audio": cut_id, "start_s": round(start, 4), "end_s": round(start + len(speech) / 16000, 4),
                         "chars": [len(text), len(text) + len(line["sentence"])], "gain_db": round(gain_db, 2)})
            entities += [[a + len(text), b + len(text), x, typ] for a, b, x, typ in line["entity"]]
            times += [[round(a + start, 4), round(b + start, 4)] for a, b in line["entity_times"]]
            parts += [np.zeros(round(pause * 16000)), speech]
            text += line["sentence"]
            cut_lines.append({**line, "audio": cut_id})
            t = start + len(speech) / 16000
        parts.append(np.zeros(round(rng.uniform(0.3, 1.0) * 16000)))
        clean = np.concatenate(parts)
        noise_kind, snr_db = rng.choice(NOISES), rng.uniform(5, 30)
        noise = subprocess.run(["sox", "-R", "-n", "-r", "16000", "-c", "1", "-b", "16", "-e", "signed-integer",
                                "-t", "raw", "-", "synth", f"{len(clean) / 16000 + 1:.3f}", noise_kind],
                               capture_output=True, check=True).stdout
        noise = np.frombuffer(noise, dtype="<i2").astype(np.float64)[: len(clean)]
        speaking = np.concatenate([np.full(len(p), i % 2 == 1) for i, p in enumerate(parts)])
        noise *= np.sqrt((clean[speaking] ** 2).mean() / (noise ** 2).mean() / 10 ** (snr_db / 10))
        mixed = clean + noise
        scale = min(1.0, 0.99 / np.abs(mixed).max())
        mixed *= scale
        rec_id = ("LONG" if split == "test" else "VLONG") + f"{k + 1:04d}"
        _write_pcm16(out / "wav" / split / f"{rec_id}.wav", mixed)
        for u in meta:
            a, b = round(u["start_s"] * 16000), round(u["end_s"] * 16000)
            _write_pcm16(out / "cut" / "wav" / split / f"{u['audio']}.wav", mixed[a:b])
        recordings.append({"sentence": text, "audio": rec_id, "entity": entities, "entity_times": times,
                           "utterances": meta, "snr_db": round(snr_db, 2), "noise": noise_kind,
                           "scale": round(scale, 4), "seconds": round(len(mixed) / 16000, 3)})
    (out / "cut" / f"{split}.json").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in cut_lines),
                                               encoding="utf-8")
    (out / f"{split}.json").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recordings),
                                       encoding="utf-8")
    return recordings


def ensure_long_form(root, seed=0, minutes=LONG_MINUTES, valid_minutes=LONG_VALID_MINUTES):
    """The long-form set of a demo corpus (build_long_form), built once into root/long-v1[-MINUTES]: the test split
    of `minutes`, and a valid split of `valid_minutes` (its own recordings, for choosing settings), each atomically
    (a set built before the valid split existed gets it added; its test split stays as it is)."""
    name = LONG_VERSION + ("" if tuple(minutes) == LONG_MINUTES else "-" + "-".join(f"{m:g}" for m in minutes))
    out = Path(root) / name
    if not (out / "test.json").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            build_long_form(root, tmp, seed, minutes)
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not (out / "valid.json").is_file():                      # a new set, or one from before the valid split
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            build_long_form(root, tmp, seed, valid_minutes, split="valid")
            for part in ("wav/valid", "cut/wav/valid", "cut/valid.json", "valid.json"):   # valid.json last: done
                shutil.rmtree(out / part, ignore_errors=True)           # what a killed build left (folders; a
                os.renames(tmp / part, out / part)                      # file is replaced by the rename)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Unseen names (#19): a test split whose PER and ORG names never occur in training, and a list of distractors

UNSEEN_VERSION = "unseen-v1"


def _new_names(rng, train_chars, taken, n, kind):
    """n PER or ORG names not in `taken` (which they join), made of training characters only: PER a surname and
    one or two given-name characters; ORG two characters a brand would use, then a company suffix."""
    surnames = [c for c in SURNAMES if c in train_chars] or sorted(train_chars)
    given = [c for c in GIVEN if c in train_chars] or sorted(train_chars)
    brand_chars = sorted(set("".join(BRANDS)) & train_chars) or sorted(train_chars)
    names = []
    for _ in range(1000 * n):
        if len(names) == n:
            break
        if kind == "PER":
            name = rng.choice(surnames) + "".join(rng.choice(given) for _ in range(rng.choice((1, 2, 2))))
        else:
            name = rng.choice(brand_chars) + rng.choice(brand_chars) + rng.choice(COMPANY_SUFFIX)
        if name not in taken and set(name) <= train_chars:
            taken.add(name)
            names.append(name)
    if len(names) < n:
        raise RuntimeError(f"demo: could not make {n} new {kind} names from the training characters (got "
                           f"{len(names)}): build the corpus with more training sentences")
    return names


def build_unseen(root, out, seed=0, n_test=400, n_distractors=1000, progress=True, workers=None):
    """An SNER test split of a demo corpus (root) whose PER and ORG names never occur in its training set, only
    characters the training text has, and entity lists to try decode.py --entities with, into out:

        test.json, wav/test/...    CNERTA layout with entity times (decode.py --dataset demo --data-dir OUT)
        names.txt                  the split's PER and ORG names (one 'NAME TYPE' a line)
        distractors.txt            n_distractors new PER names and as many ORG names, in no demo split
        entities.txt               names.txt + distractors.txt, shuffled: the list the targets use
    Sentences come from the corpus templates that hold a PER or ORG slot, the names in those slots drawn new."""
    root, out = Path(root), Path(out)
    rng = random.Random(f"{UNSEEN_VERSION}:{seed}")
    lines = {name: [json.loads(x) for x in (root / name).read_text(encoding="utf-8").splitlines() if x.strip()]
             for _, name, _ in SPLITS}
    train_chars = set("".join(d["sentence"] for d in lines["train.json"]))
    taken = {e[2] for d in sum(lines.values(), []) for e in d["entity"]}          # every entity of every split
    trained = {e[2] for d in lines["train.json"] for e in d["entity"] if e[3] in ("PER", "ORG")}
    P = Pools(seed)
    templates = [t for t in TEMPLATES if "{PER}" in t or "{ORG}" in t]
    records, names, utt = [], {"PER": [], "ORG": []}, 0
    draws = {"PER": lambda r, P, split: span("PER", *_new_names(r, train_chars, taken, 1, "PER")),
             "ORG": lambda r, P, split: span("ORG", *_new_names(r, train_chars, taken, 1, "ORG"))}
    for attempt in range(1000 * n_test):
        if len(records) == n_test:
            break
        text, ents = fill(rng.choice(templates), rng, P, "test", draws)
        if not 8 <= len(text) <= 24 or not set(text) <= train_chars or any(
                t in ("PER", "ORG") and text[a:b] in trained for a, b, t in ents):   # other ORG slots: seen names
            continue
        k = rng.randrange(len(SPEAKERS))
        variant, gender, rate, pitch = SPEAKERS[k]
        utt += 1
        records.append(dict(sentence=text, audio=f"UNSEEN01S{k + 1:04d}W{utt:04d}",
                            entity=[[a, b, text[a:b], t] for a, b, t in ents], speaker_info=gender,
                            voice=variant, rate=rate + rng.randint(-12, 12), pitch=pitch + rng.randint(-6, 6)))
        for a, b, t in ents:
            if t in names and text[a:b] not in names[t]:
                names[t].append(text[a:b])
    if len(records) < n_test:
        raise RuntimeError(f"demo: could not draw {n_test} unseen-name sentences from the training characters of "
                           f"{root} (got {len(records)}): build the corpus with more training sentences")
    jobs = [(to_pinyin(r["sentence"]), r["voice"], r["rate"], r["pitch"],
             out / "wav" / "test" / r["audio"][8:13] / f"{r['audio']}.wav") for r in records]
    for r, (_, word_seconds) in zip(records, speak(jobs, progress, workers)):
        r["entity_times"] = entity_times(r["entity"], word_seconds)
    keys = ("sentence", "audio", "entity", "entity_times", "speaker_info")
    (out / "test.json").write_text("".join(json.dumps({k: r[k] for k in keys}, ensure_ascii=False) + "\n"
                                           for r in records), encoding="utf-8")
    listed = [f"{n} {t}" for t in ("PER", "ORG") for n in names[t]]
    distractors = [f"{n} {t}" for t in ("PER", "ORG") for n in _new_names(rng, train_chars, taken, n_distractors, t)]
    mixed = listed + distractors
    rng.shuffle(mixed)
    for name, entries in (("names.txt", listed), ("distractors.txt", distractors), ("entities.txt", mixed)):
        (out / name).write_text("".join(x + "\n" for x in entries), encoding="utf-8")
    return {"sentences": len(records), "names": {t: len(v) for t, v in names.items()},
            "distractors": len(distractors)}


def ensure_unseen(root, seed=0, progress=True, workers=None):
    """The unseen-names set of a demo corpus (build_unseen), built once into root/unseen-v1, atomically."""
    out = Path(root) / UNSEEN_VERSION
    if (out / "entities.txt").is_file():
        return out
    check_tools()
    tmp = Path(tempfile.mkdtemp(prefix=f".{UNSEEN_VERSION}.tmp-", dir=root))
    try:
        build_unseen(root, tmp, seed, progress=progress, workers=workers)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="corpus folder (default: $IMAGE_CACHE or ~/.cache/image, "
                   f"subfolder {VERSION}-seed<N>[...])")
    p.add_argument("--seed", type=int, default=0, help="seed: sentences, held-out entities, voices (default 0)")
    p.add_argument("--n-train", type=int, default=DEFAULT_COUNTS["n_train"], help=f"training sentences (default {DEFAULT_COUNTS['n_train']})")
    p.add_argument("--n-dev", type=int, default=DEFAULT_COUNTS["n_dev"], help=f"dev sentences, valid.json (default {DEFAULT_COUNTS['n_dev']})")
    p.add_argument("--n-test", type=int, default=DEFAULT_COUNTS["n_test"], help=f"test sentences (default {DEFAULT_COUNTS['n_test']})")
    p.add_argument("--no-audio", action="store_true", help="text only: JSON files without wavs (seconds)")
    p.add_argument("--workers", type=int, default=None, help="parallel synthesis jobs (default: CPU count)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--long-form", default=None, metavar="MINUTES", help="also build the long recordings of the test "
                   "split (#18: comma-separated lengths in minutes, e.g. 1,2,3,5,7,10) into CORPUS/long-v1[-...], "
                   "and a valid split of 1, 2, 3 and 5 minutes from the valid utterances, for choosing settings")
    p.add_argument("--unseen", action="store_true", help="also build a test split whose PER and ORG names never "
                   "occur in training, with their names and 2,000 distractors as entity lists (#19), into "
                   f"CORPUS/{UNSEEN_VERSION}")
    args = p.parse_args(argv)
    try:
        minutes = tuple(float(m) for m in args.long_form.split(",")) if args.long_form else None
        if minutes is not None and not all(0 < m <= 120 for m in minutes):
            raise ValueError
    except ValueError:
        p.error(f"--long-form {args.long_form!r}: expected comma-separated minutes in (0, 120]")
    counts = dict(n_train=args.n_train, n_dev=args.n_dev, n_test=args.n_test)
    existed = (Path(args.out or default_root(args.seed, not args.no_audio, **counts)) / "meta.json").is_file()
    t0 = time.time()
    try:
        root = ensure_demo_corpus(args.out, args.seed, not args.quiet, args.n_train, args.n_dev, args.n_test,
                                  audio=not args.no_audio, workers=args.workers)
    except (RuntimeError, ValueError, FileExistsError) as e:
        sys.exit(f"error: {e}")
    meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
    took = time.time() - t0
    print(f"demo corpus: {root}  ({'already there' if existed else 'built in %.1f s' % took}; "
          f"generation took {meta['generation_seconds']} s)")
    for split, s in meta["splits"].items():
        print(f"  {split:5s} {s['sentences']:5d} sentences  {s['entities']}  nested in {s['nested_sentences']}"
              f"  audio {s['audio_seconds'] / 3600:.2f} h")
    if minutes is not None:
        if not meta["audio"]:
            sys.exit("error: --long-form needs the corpus with audio (not --no-audio)")
        long_dir = ensure_long_form(root, args.seed, minutes)
        print(f"long recordings: {long_dir}  (decode.py --dataset cnerta --data-dir {long_dir} --split test, or "
              f"--split valid; cut at the utterances: --dataset demo --data-dir {long_dir / 'cut'})")
    if args.unseen:
        try:
            unseen = ensure_unseen(root, args.seed, not args.quiet, args.workers)
        except RuntimeError as e:
            sys.exit(f"error: {e}")
        print(f"unseen names: {unseen}  (decode.py --dataset demo --data-dir {unseen} --split test --task SNER "
              f"--entities {unseen / 'entities.txt'})")


if __name__ == "__main__":
    main()
