#!/usr/bin/env python3
"""Tokenizer fixtures: a corpus a medical chatbot meets, with the ids of both reference libraries.

    regenerate:  python3 tests/ref/make_tokenizer_fixtures.py     (from the repo root, with
                 tests/ref/requirements.txt installed; on the dev machines /work/venv/bin/python)
    needs:       tiktoken, tokenizers, safetensors, numpy (tests/ref/requirements.txt)
    writes:      tests/fixtures/tokenizer/corpus.safetensors

The corpus is composed here from hand-written parts with a fixed seed: English and Chinese
medical questions and answers (in the model card's ###System/###Question/###Answer template and in
the Llama 3 chat template), Japanese, Korean, Arabic, Hindi, Russian, Greek, Hebrew, Thai and
Vietnamese sentences, code, numbers with units, emoji with ZWJ sequences and skin tones, runs of
spaces, tabs and \\r\\n, contractions in any case, fullwidth forms, combining marks, text that
spells special tokens, very long words and numbers, random strings over every character class,
and a sweep over the boundaries of medbot's Unicode table.

For every record it stores the ids of tiktoken (Meta's tokenizer.model, the Llama 3 pattern and
the 256 Llama 3.1 special tokens, allowed_special="all") and asserts that `tokenizers`
(tokenizer.json, add_special_tokens=False) gives the same ids; likewise with special tokens
encoded as text (tiktoken encode_ordinary; tokenizers encode_special_tokens=True), and that
add_special_tokens=True only puts <|begin_of_text|> in front. It also stores the pre-tokenizer's
piece boundaries (tokenizers' pre_tokenize_str) and decodings of random id sequences (tiktoken's
decode with errors="replace" and tokenizers' decode, asserted equal, plus skip_special_tokens).
"""
import json
import os
import random
import struct
import sys

import numpy as np
import tiktoken
import tokenizers
from tiktoken.load import load_tiktoken_bpe

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer", "corpus.safetensors")
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
R = random.Random(20240723)

# ---------------------------------------------------------------------------------------------
# English medical questions and answers

CONDITIONS = ["type 2 diabetes", "hypertension", "asthma", "migraine", "iron-deficiency anemia", "hypothyroidism",
              "atrial fibrillation", "COPD", "gastroesophageal reflux disease (GERD)", "chronic kidney disease",
              "rheumatoid arthritis", "osteoporosis", "major depressive disorder", "generalized anxiety disorder",
              "pneumonia", "urinary tract infection", "sinusitis", "eczema", "psoriasis", "gout", "hepatitis B",
              "Lyme disease", "celiac disease", "irritable bowel syndrome", "obstructive sleep apnea",
              "heart failure with reduced ejection fraction", "deep vein thrombosis", "Parkinson's disease",
              "Alzheimer's disease", "multiple sclerosis", "polycystic ovary syndrome", "gestational diabetes",
              "pre-eclampsia", "otitis media", "strep throat", "influenza A (H1N1)", "COVID-19", "shingles",
              "tuberculosis", "hyperlipidemia", "benign prostatic hyperplasia", "glaucoma", "cataracts"]
DRUGS = [("metformin", "500 mg", "twice daily with meals"), ("lisinopril", "10 mg", "once daily"),
         ("amlodipine", "5 mg", "once a day"), ("atorvastatin", "20 mg", "at bedtime"),
         ("levothyroxine", "50 µg", "every morning on an empty stomach"), ("albuterol", "90 µg/puff", "2 puffs q4-6h PRN"),
         ("ibuprofen", "400 mg", "every 6–8 hours"), ("acetaminophen (paracetamol)", "1 g", "q6h, max 4 g/24h"),
         ("amoxicillin", "875 mg", "BID × 10 days"), ("azithromycin", "500 mg", "on day 1, then 250 mg daily ×4"),
         ("warfarin", "5 mg", "daily, target INR 2.0–3.0"), ("apixaban", "5 mg", "b.i.d."),
         ("insulin glargine", "10 IU", "subcutaneously at night"), ("omeprazole", "20 mg", "30 min before breakfast"),
         ("sertraline", "50 mg", "once daily"), ("prednisone", "40 mg", "tapered over 2 weeks"),
         ("furosemide", "40 mg", "IV push"), ("ferrous sulfate", "325 mg (65 mg elemental iron)", "every other day"),
         ("vitamin D3", "1,000–2,000 IU", "daily"), ("oseltamivir", "75 mg", "twice daily for 5 days"),
         ("nitrofurantoin", "100 mg", "BID for 5 d"), ("allopurinol", "100 mg", "daily, titrate by 100 mg q2-4wk"),
         ("salbutamol", "2.5 mg/2.5 mL", "via nebulizer"), ("methotrexate", "15 mg", "ONCE WEEKLY (not daily!)"),
         ("semaglutide", "0.25 mg", "SC once weekly"), ("empagliflozin", "10 mg", "qAM"),
         ("hydrochlorothiazide", "12.5 mg", "daily"), ("clopidogrel", "75 mg", "once daily"),
         ("montelukast", "10 mg", "in the evening"), ("doxycycline", "100 mg", "q12h with a full glass of water")]
SYMPTOMS = ["a persistent dry cough", "chest tightness", "shortness of breath on exertion", "a pounding headache",
            "blurred vision", "night sweats", "unexplained weight loss of 5 kg", "swollen ankles", "palpitations",
            "burning on urination", "joint pain in the morning", "a rash that won't go away", "fatigue",
            "numbness in my left hand", "dizziness when I stand up", "a fever of 38.9°C (102°F)",
            "abdominal pain after meals", "frequent urination at night", "ringing in the ears", "a sore throat"]
LABS = [("HbA1c", "7.8%", "<5.7%"), ("fasting glucose", "126 mg/dL", "70–99 mg/dL"), ("LDL-C", "4.1 mmol/L", "<2.6 mmol/L"),
        ("TSH", "6.2 mIU/L", "0.4–4.0 mIU/L"), ("hemoglobin", "10.2 g/dL", "12–15.5 g/dL"), ("creatinine", "1.4 mg/dL", "0.6–1.2"),
        ("eGFR", "52 mL/min/1.73m²", "≥90"), ("ALT", "88 U/L", "7–56 U/L"), ("ferritin", "9 ng/mL", "30–300 ng/mL"),
        ("potassium", "5.6 mEq/L", "3.5–5.0 mEq/L"), ("INR", "3.4", "2.0–3.0"), ("CRP", "42 mg/L", "<10 mg/L"),
        ("vitamin B12", "180 pg/mL", "200–900 pg/mL"), ("uric acid", "9.1 mg/dL", "3.4–7.0"), ("WBC", "13.5 ×10⁹/L", "4.5–11.0 ×10⁹/L"),
        ("blood pressure", "152/96 mmHg", "<120/80 mmHg"), ("SpO₂", "91%", "95–100%"), ("BMI", "31.4 kg/m²", "18.5–24.9")]
WHO = ["I", "My mother", "My 6-year-old son", "My husband", "My grandfather (82 y/o)", "A friend of mine", "My wife",
       "I'm 34 weeks pregnant and I", "My teenage daughter", "MY DAD"]
QUESTIONS = [
    "{who} was just diagnosed with {cond}. What does that mean and what should we do next?",
    "What's the usual dose of {drug} for {cond}?",
    "Is it safe to take {drug} and {drug2} together?",
    "{who} has had {sym} for about {n} days. Should I be worried?",
    "My {lab} came back at {labv}. Is that high? The reference range says {labr}.",
    "Can {cond} be cured, or is it lifelong?",
    "What are the side effects of {drug} {dose}?",
    "I forgot to take my {drug} this morning. Should I take two doses tonight?",
    "How long does it take for {drug} to start working?",
    "What's the difference between {cond} and {cond2}?",
    "Why does my doctor want me to check my {lab} every {n} months?",
    "{who} has {sym} and {sym2}. Could it be {cond}?",
    "Are there foods I shouldn't eat while taking {drug}?",
    "I'VE BEEN TAKING {DRUG} FOR {n} WEEKS AND IT ISN'T HELPING. WHAT NOW??",
    "Doc, what's a normal {lab}? Mine's {labv}...",
    "can i drink alcohol with {drug}",
    "How do I know if {cond} is getting worse?",
    "We're traveling abroad for {n} weeks: how should {who_l} store {drug}?",
    "Is {temp} a fever for a baby?",
    "They'd said it's 'nothing serious' but I'm still worried about {sym}.",
]
ANSWERS = [
    "{cond_c} is a common condition, and with the right treatment most people live full, active lives.",
    "The usual starting dose of {drug} is {dose} {freq}, but your doctor may adjust it based on your kidney function.",
    "Please don't double up on doses: if you miss one, take it as soon as you remember unless it's almost time for the next.",
    "A {lab} of {labv} is outside the typical reference range ({labr}), so it's worth discussing with your clinician.",
    "Common side effects include nausea, headache and dizziness; they're usually mild and improve within 1–2 weeks.",
    "Seek emergency care right away if you notice chest pain, trouble breathing, or weakness on one side of the body.",
    "It's important to keep taking {drug} even when you feel well, because {cond} often has no symptoms.",
    "You'll want to recheck your {lab} in about {n} weeks to see whether the treatment is working.",
    "For a child weighing {kg} kg, the dose is calculated as {mgkg} mg/kg, i.e. about {total} mg per dose.",
    "Lifestyle changes matter too: aim for 150 min/week of moderate exercise, less salt (<2,300 mg/day) and 7–9 h of sleep.",
    "A temperature of {temp} or higher in an infant younger than 3 months should always be checked by a doctor.",
    "Don't stop {drug} abruptly; talk to your prescriber about tapering first.",
    "Drug interactions between {drug} and {drug2} are possible, so ask your pharmacist to review your full medication list.",
    "I'm not able to diagnose you, but {sym} together with {sym2} can have many causes, including {cond}.",
    "Keep a symptom diary (date, time, severity 0–10, what you ate) and bring it to your next appointment.",
    "If your blood pressure stays above 140/90 mmHg on repeated readings, treatment is usually recommended.",
    "We'd recommend a follow-up visit in {n} weeks, or sooner if things get worse.",
    "Store {drug} at 20–25°C (68–77°F), away from moisture; insulin in use can stay at room temperature for up to 28 days.",
    "Vaccination remains the best protection: the annual flu shot reduces the risk of hospitalization by ~40–60%.",
    "NOTE: This answer is for general information only and isn't a substitute for professional medical advice.",
    "They're both treatable; the key difference is that {cond} affects the whole body, whereas {cond2} is usually local.",
    "Drink plenty of fluids (about 2–3 L/day unless you've been told to restrict them) and rest.",
    "Your doctor may order an ECG, a chest X-ray, or blood tests such as {lab} to find the cause.",
]
SYSTEM = "You are a Medical Chatbot, you should friendly answer the question."


def fill(template):
    d1, d2 = R.sample(DRUGS, 2)
    c1, c2 = R.sample(CONDITIONS, 2)
    l = R.choice(LABS)
    s1, s2 = R.sample(SYMPTOMS, 2)
    kg = R.choice([8, 12.5, 18, 23, 31])
    mgkg = R.choice([10, 15, 20])
    who = R.choice(WHO)
    vals = dict(who=who, who_l=who[0].lower() + who[1:] if who != "I" else "I", cond=c1, cond2=c2,
                cond_c=c1[0].upper() + c1[1:], drug=d1[0], drug2=d2[0], DRUG=d1[0].upper(), dose=d1[1], freq=d1[2],
                sym=s1, sym2=s2, lab=l[0], labv=l[1], labr=l[2], n=R.randint(2, 14), kg=kg, mgkg=mgkg,
                total=round(kg * mgkg, 1), temp=R.choice(["38°C", "100.4°F", "37.5 °C", "39.2℃", "38,5 °C"]))
    return template.format(**vals)


def english_qa():
    q = fill(R.choice(QUESTIONS))
    a = " ".join(fill(R.choice(ANSWERS)) for _ in range(R.randint(2, 7)))
    style = R.random()
    if style < 0.45:
        return f"###System: {SYSTEM}\n###Question: {q}\n###Answer: {a}"
    if style < 0.65:
        return ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + SYSTEM +
                "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n" + q +
                "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n" + a + "<|eot_id|>")
    if style < 0.8:
        bullets = "\n".join(f"{R.choice(['-', '*', '•', '1.', '2)', '  -', chr(9) + '-'])} {fill(R.choice(ANSWERS))}"
                            for _ in range(R.randint(2, 5)))
        return f"Q: {q}\r\nA: {a}\r\n\r\n{bullets}\n"
    return q + "\n\n" + a


# ---------------------------------------------------------------------------------------------
# Chinese medical questions and answers (the model card's language)

ZH_COND = ["高血压", "2型糖尿病", "哮喘", "偏头痛", "缺铁性贫血", "甲状腺功能减退症", "慢性胃炎", "冠心病", "痛风", "骨质疏松症",
           "抑郁症", "失眠", "过敏性鼻炎", "乙型肝炎", "肺炎", "尿路感染", "类风湿关节炎", "高脂血症", "慢性肾病", "带状疱疹"]
ZH_DRUG = [("二甲双胍", "0.5g", "每日2次"), ("硝苯地平控释片", "30mg", "每日1次"), ("阿托伐他汀", "20 mg", "睡前服用"),
           ("布洛芬", "400mg", "必要时每6小时1次"), ("阿莫西林", "0.5 g", "每8小时一次，连用7天"), ("奥美拉唑", "20mg", "早餐前30分钟"),
           ("左甲状腺素钠", "50μg", "晨起空腹"), ("阿司匹林肠溶片", "100 mg", "每日一次"), ("胰岛素", "10单位", "睡前皮下注射"),
           ("连花清瘟胶囊", "4粒", "一日3次"), ("头孢克肟", "100mg", "每日2次"), ("维生素D", "800 IU", "每天")]
ZH_SYM = ["头晕", "胸闷气短", "咳嗽两周", "发烧38.5℃", "腹痛腹泻", "关节肿痛", "夜间多尿", "视力模糊", "心慌", "皮疹瘙痒", "失眠多梦"]
ZH_Q = ["医生您好，我{who}被诊断为{cond}，请问需要注意什么？",
        "{drug}一次吃多少？{freq}可以吗？",
        "我最近{sym}，已经{n}天了，是不是{cond}？",
        "空腹血糖{glu}mmol/L，糖化血红蛋白{a1c}%，这个正常吗？",
        "血压{bp}mmHg，需要吃药吗？",
        "{drug}和{drug2}能一起吃吗？有没有相互作用？",
        "孩子{age}岁，体重{kg}公斤，发烧{temp}℃，怎么办？",
        "请问{cond}能根治吗？需要终身服药吗？",
        "吃了{drug}以后出现{sym}，是副作用吗？"]
ZH_A = ["您好！根据您的描述，{cond}是一种常见的慢性疾病，需要长期规范治疗。",
        "{drug}的常用剂量为{dose}，{freq}，具体请遵医嘱。",
        "建议您尽快到医院就诊，完善血常规、肝肾功能、心电图等检查。",
        "平时要注意低盐低脂饮食（每日食盐＜5g），戒烟限酒，适量运动（每周≥150分钟）。",
        "如果出现胸痛、呼吸困难、意识不清等情况，请立即拨打120急救电话！",
        "空腹血糖正常值为3.9～6.1 mmol/L，糖化血红蛋白应＜6.5%。",
        "不建议自行停药或调整剂量；如有不适，请及时复诊。",
        "儿童用药需按体重计算：布洛芬每次5～10mg/kg，两次用药间隔≥6小时，24小时内不超过4次。",
        "以上内容仅供参考，不能代替医生的面诊和治疗。祝您早日康复～",
        "多喝水，注意休息，保持心情舒畅；３天后症状无改善请复查。",
        "（注：{drug}可能引起胃肠道反应，如恶心、腹胀，一般1～2周后缓解。）"]


def chinese_qa():
    d1, d2 = R.sample(ZH_DRUG, 2)
    v = dict(who=R.choice(["", "父亲", "母亲", "爷爷", "孩子", "老公"]), cond=R.choice(ZH_COND), drug=d1[0], drug2=d2[0],
             dose=d1[1], freq=d1[2], sym=R.choice(ZH_SYM), n=R.randint(2, 30), glu=R.choice(["7.2", "6.8", "11.3", "5.4"]),
             a1c=R.choice(["6.9", "8.1", "5.6"]), bp=R.choice(["150/95", "135/85", "168/102"]), age=R.randint(1, 12),
             kg=R.randint(9, 40), temp=R.choice(["38.5", "39", "39.6", "37.8"]))
    q = R.choice(ZH_Q).format(**v)
    a = "".join(R.choice(ZH_A).format(**v) for _ in range(R.randint(2, 6)))
    if R.random() < 0.6:
        return f"###System: {SYSTEM}\n###Question: {q}\n###Answer: {a}"
    return f"问：{q}\n答：{a}"


# ---------------------------------------------------------------------------------------------
# other scripts (short hand-written medical sentences, composed)

OTHER_LANGS = {
    "ja": ["頭痛が3日間続いています。市販の鎮痛薬を飲んでもいいですか？", "血圧は140/90mmHgでした。", "お大事にしてください。",
           "薬は食後に服用してください。", "アレルギーはありますか？", "インフルエンザの予防接種を受けましょう。",
           "カタカナのテスト：ワクチン、アスピリン、インスリン。", "ﾊﾝｶｸｶﾀｶﾅ ﾉ ﾃｽﾄ。"],
    "ko": ["머리가 아프고 열이 38.5도까지 올라요.", "하루에 두 번, 식후 30분에 복용하세요.", "병원에 가 보시는 게 좋겠습니다.",
           "당뇨병 환자는 혈당을 자주 확인해야 합니다.", "알레르기가 있으신가요?", "ᄒᆞᆫ글 자모 조합 테스트"],
    "ar": ["أعاني من صداع مستمر منذ ثلاثة أيام.", "يجب تناول الدواء مرتين يومياً بعد الأكل.", "ضغط الدم ١٤٠/٩٠ ملم زئبق.",
           "هَلْ تُعَانِي مِنْ حَسَاسِيَّةٍ؟", "اشرب الكثير من الماء واسترح."],
    "hi": ["मुझे तीन दिनों से बुखार है।", "दवा दिन में दो बार खाना खाने के बाद लें।", "रक्तचाप १४०/९० है।",
           "कृपया डॉक्टर से परामर्श करें।", "क्या आपको किसी दवा से एलर्जी है?"],
    "ru": ["У меня болит голова уже три дня.", "Принимайте по 1 таблетке 2 раза в день после еды.",
           "Артериальное давление 140/90 мм рт. ст.", "Обратитесь к врачу, если температура выше 38,5 °C.",
           "ЁЛКИ-ПАЛКИ, ЭТО НЕ ШУТКА!", "Съешь же ещё этих мягких французских булок."],
    "el": ["Έχω πονοκέφαλο εδώ και τρεις μέρες.", "Πάρτε ένα δισκίο δύο φορές την ημέρα.", "Η αρτηριακή πίεση είναι 140/90.",
           "ΣΥΜΒΟΥΛΕΥΤΕΙΤΕ ΤΟΝ ΓΙΑΤΡΟ ΣΑΣ.", "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία; ΐΰ ς"],
    "he": ["יש לי כאב ראש כבר שלושה ימים.", "יש ליטול את התרופה פעמיים ביום.", "שָׁלוֹם, מָה שְׁלוֹמְךָ?"],
    "th": ["ฉันปวดหัวมาสามวันแล้ว", "รับประทานยาวันละ 2 ครั้งหลังอาหาร", "ความดันโลหิต ๑๔๐/๙๐"],
    "vi": ["Tôi bị đau đầu ba ngày nay.", "Uống thuốc hai lần mỗi ngày sau bữa ăn.", "Tiếng Việt có dấu: ạ ả ã ắ ằ ẳ ẵ ặ.",
           "Tie\u0302\u0301ng Vie\u0323\u0302t (decomposed marks)."],
    "ta": ["எனக்கு மூன்று நாட்களாக தலைவலி.", "மருந்தை நாளுக்கு இரண்டு முறை எடுத்துக்கொள்ளவும்."],
    "mixed": ["Patient 患者 환자 المريض रोगी пациент ασθενής: BP 120/80, HR 72 bpm, T 36.6°C.",
              "Dx: 2型糖尿病 (T2DM), HbA1c 8.1% → 加用 empagliflozin 10mg qd.",
              "Allergies / アレルギー / 알레르기: penicillin (アナフィラキシー)."],
}


def other_langs():
    lang = R.choice(list(OTHER_LANGS))
    parts = R.choices(OTHER_LANGS[lang], k=R.randint(2, 8))
    sep = R.choice([" ", "\n", "  ", "\r\n", "", "\t"])
    return sep.join(parts)


# ---------------------------------------------------------------------------------------------
# code, numbers, emoji, whitespace, contractions, specials, long runs, random strings

CODE = [
    'def bmi(weight_kg: float, height_m: float) -> float:\n    """Body-mass index."""\n    return round(weight_kg / height_m ** 2, 1)\n',
    "for (size_t i = 0; i < n; i++) {\n\tif (dose[i] > MAX_DOSE_MG) {\n\t\tfprintf(stderr, \"dose %zu too high: %.2f mg\\n\", i, dose[i]);\n\t}\n}\n",
    '{"patient_id": 10423, "vitals": {"bp": "120/80", "hr": 72, "spo2": 0.98}, "meds": ["metformin", "lisinopril"], "allergies": null}',
    "SELECT p.id, p.name, AVG(l.value) AS avg_hba1c\nFROM patients p JOIN labs l ON l.patient_id = p.id\nWHERE l.code = 'HBA1C' AND l.taken_at >= '2024-01-01'\nGROUP BY p.id HAVING avg_hba1c > 7.0;\n",
    '<div class="alert alert-warning">\r\n  <p>Take <b>1&nbsp;tablet</b> twice daily &mdash; don&#39;t crush!</p>\r\n</div>\r\n',
    "#!/bin/sh\nset -eu\nfor f in data/*.jsonl; do\n  wc -l \"$f\" | awk '{print $1}'\ndone 2>/dev/null || echo 'no data'\n",
    "x = re.compile(r\"^(?P<drug>[A-Za-z]+)\\s+(?P<dose>\\d+(?:\\.\\d+)?)\\s*(mg|µg|g)$\", re.I)\n",
    "if __name__ == '__main__':\n    import sys; print(sys.argv[1:]) ; exit(0)\n",
    "const dose = weightKg * 15; // mg/kg → mg\nconsole.log(`dose=${dose.toFixed(1)} mg`);\n",
    "    \n        \n\t\t\n    return x;    \n",
    "std::vector<std::pair<int,double>> v{{1,0.5},{2,1e-3}}; v.emplace_back(3, -2.5e+10);\n",
    "diff --git a/medbot.c b/medbot.c\n@@ -1,3 +1,4 @@\n-int x;\n+int x = 0;\n+// TODO(someone): fix this\n",
]
EMOJI = ["👨‍⚕️", "👩🏽‍⚕️", "🧑🏿‍🔬", "❤️‍🩹", "🏳️‍🌈", "👨‍👩‍👧‍👦", "🇨🇳", "🇺🇸", "🇯🇵", "1️⃣", "#️⃣", "💊", "🩺", "🩹", "🤒", "🤧",
         "😷", "🏥", "🚑", "👍🏻", "👍🏼", "👍🏽", "👍🏾", "👍🏿", "🙏", "✅", "❌", "⚠️", "☢️", "🧬", "🦠", "💉", "🫀", "🫁", "🧠",
         "😀", "🥲", "🫠", "🤝🏻", "🧑‍🤝‍🧑", "🏃‍♀️", "🏃🏻‍♂️‍➡️", "©", "®", "™", "↔", "★", "☆", "♥"]
CONTRACTIONS = ["it's", "IT'S", "It'S", "don't", "DON'T", "you'll", "YOU'LL", "You'Ll", "I've", "I'VE", "we'd", "WE'D",
                "they're", "THEY'RE", "They'Re", "I'm", "I'M", "she's", "SHE'S", "wasn't", "it’s", "don’t", "you’ll",
                "'s", "'S", "'t", "'T", "'re", "'RE", "'rE", "'ve", "'VE", "'Ve", "'m", "'M", "'ll", "'LL", "'lL", "'d", "'D",
                "'ſ", "x'ſa", "''s", "'s'", "'''", "'sss", "'tis", "'ello", "rock'n'roll", "o'clock", "O'Brien", "'12",
                "'", "' s", "'\u017fs", "'K", "'\u212a", "’S", "‘quoted’", "\"it's\"", "'s's's"]
SPECIALS = ["<|eot_id|>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
            "<|python_tag|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<|reserved_special_token_10|>",
            "<|reserved_special_token_247|>", "<|reserved_special_token_248|>", "<|reserved_special_token_2|>",
            "<|eot_id", "<|eot_id|", "eot_id|>", "<<|eot_id|>>", "< |eot_id|>", "<|EOT_ID|>", "<|eot_id|><|eot_id|>",
            "<|<|eot_id|>", "<|step_id|>", "<|", "|>", "<", ">", "<|>"]
WS = [" ", "  ", "   ", " " * 7, " " * 16, "\t", "\t\t", " \t", "\n", "\n\n", "\n\n\n", "\r\n", "\r\n\r\n", "\r", "\r\r\n",
      " \n", "  \n", " \n\n ", "\n \n", "\t\n", "\n\t", "\u00a0", "\u3000", "\u2028", "\u2029", "\u0085", "\u000b", "\u000c",
      "\u2003", "\u202f", "\u200b", "\ufeff", "\u1680", "\u180e", "\u001c", "\u001f", " \u00a0 ", "\u3000\u3000"]
NUMBERS = ["1", "12", "123", "1234", "12345", "123456", "1234567", "3.14159", "0.001", "1e-6", "6.02×10²³", "1,000,000",
           "1 000 000", "+86 138-0013-8000", "(555) 123-4567", "2024-07-23T08:30:00Z", "37.5°C", "98.6°F", "120/80",
           "±0.5", "µg", "μg", "5µg/kg/min", "10⁻³", "x²", "½", "¾", "⅓", "Ⅻ", "ⅷ", "①②③", "١٢٣", "१२३", "১২৩", "๑๒๓",
           "１２３４５", "ＡＢＣ ｄｅｆ", "＄１００", "ｍｇ／ｄＬ", "100%", "50‰", "3–5", "3—5", "3‒5", "≤", "≥", "≠", "→", "⇒",
           "№5", "#42", "$12.50", "€9,99", "¥1000", "£5", "₹250", "0x7FFF", "0b1010", "007", "00000000", "9" * 30,
           "1/2", "1:1000", "5mg", "10mL", "2x", "3rd", "21st", "v1.2.3-rc.4", "IPv6 ::1", "192.168.0.1"]
MARKS = ["e\u0301", "a\u0308", "\u0301", "\u0301\u0301", "n\u0303o", "\u0915\u094d\u0937", "\u0e01\u0e34\u0e48",
         "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324\u031e\u0349\u035a\u032f\u031e\u0320\u034d",
         " \u0301a", "'\u0301s", "1\u0301", "\u20dd", "a\u20e3", "\u1100\u1161\u11a8", "\u0627\u064e\u0644\u0652"]
WORDS = ("the of and to in is for that with on as are be by this at from or an have it not can was but all your "
         "patient doctor dose tablet mg blood pressure heart pain fever cough infection therapy").split()
URLS = ["https://www.who.int/news-room/fact-sheets/detail/diabetes", "mailto:clinic@example.org?subject=Refill%20request",
        "C:\\Users\\doctor\\Documents\\labs_2024.xlsx", "/usr/local/share/medbot/weights/", "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="]


def snippet_mix():
    pools = [CODE, EMOJI, CONTRACTIONS, SPECIALS, WS, NUMBERS, MARKS, WORDS, URLS]
    parts = []
    for _ in range(R.randint(3, 30)):
        pool = R.choice(pools)
        p = R.choice(pool)
        if R.random() < 0.3:
            p = R.choice(WS) + p
        if R.random() < 0.3:
            p = p + R.choice(WS)
        parts.append(p)
    return R.choice(["", " ", ""]).join(parts)


def whitespace_cases():
    """Hand-picked regex edge cases around whitespace and newlines."""
    base = ["a  b", "a \nb", "a  \n  b", "a \n\n b", " \n\n ", "\n\n", " ", "  ", "a ", "a  ", "a\n", "a\n ", "a \n",
            "\t\ta", "a\t\t", "a \t b", "a\r\nb", "a\r\n\r\nb", "a \r\n b", "a\r \nb", "\r\n", "a\rb", "a\u3000b",
            "a\u3000\u3000b", "a\u00a0\u00a0b", "a \u00a0b", "a\u2028b", "a \u2028 b", "!!\n\n", "!! \n", " !!", "  !!",
            " !!\r\n\r\n", "?\n", "...\n\n\nx", "a.\n", "1 2", "1  2", "1\n2", "x = 1;  // c\n", "  - item\n  - item\n",
            "\n\n\n   \n\n", "word\n\n\n\n\n\nword", "end.   ", "   start", "\t", "\x0b\x0c", "a\x0bb", "a\x1cb", "a\x85b"]
    return R.choice(base) + R.choice(["", " ", "\n", "x"]) + R.choice(base)


def long_runs():
    kind = R.randrange(8)
    n = R.choice([100, 300, 1000, 3000, 6000])
    if kind == 0:
        return "a" * n
    if kind == 1:
        return "".join(R.choice("0123456789") for _ in range(n))
    if kind == 2:
        return "Pneumonoultramicroscopicsilicovolcanoconiosis" * (n // 45 + 1)
    if kind == 3:
        return "".join(R.choice("糖尿病高血压患者需要长期服药控制血糖和血压水平") for _ in range(n // 3))
    if kind == 4:
        return " " * n + "x"
    if kind == 5:
        return "\n" * (n // 10) + "x" + "\r\n" * (n // 10)
    if kind == 6:
        return "".join(R.choice("ABCDEFabcdef0123456789+/=") for _ in range(n))
    return "!" * (n // 3) + "?" * (n // 3) + "…" * 10


# random strings over every character class the regex distinguishes
RANDOM_POOLS = [
    "abcxyzABCXYZ", "éüßøñçÆŒ", "ſK", "αβγΩΣς", "абвЖЩЁ", "中文字医生病", "ひらがなカタカナ", "한국어", "عربي", "हिन्दी", "ไทย",
    "0123456789", "٠١٢٣", "०१२", "²³¹½¼Ⅻ①", "１２３", "ＡＢＣ", " ", "  ", "\t", "\n", "\r", "\r\n", "\u00a0\u3000\u2028\u0085",
    "\u000b\u000c", "!?.,;:", "'\"`", "’‘“”", "()[]{}<>", "+-*/=%", "@#$&^~|\\_", "°±µ×÷", "€£¥₹", "—–…", "·•※",
    "\u0301\u0308\u0323", "\u200b\u200c\u200d\ufeff", "👨‍⚕️👍🏽❤️🇨🇳", "\U0001F600\U0001F9EC", "\U00010D40\U00010D50\U000105C0",
    "\U00011F04\U0001E4D0\U0001E4F0", "\U000E0001\U000E0061", "\U0010FFFD\U000F0000", "\U0001D400\U0001D7CE", "'s'S'll'LL",
    "<|eot_id|>", "<|", "|>"]


def random_string():
    pools = R.sample(RANDOM_POOLS, R.randint(2, 8))
    return "".join(R.choice(R.choice(pools)) for _ in range(R.randint(1, 400)))


def table_sweep():
    """Every class boundary of medbot's Unicode table, +-1, in contexts that tell the classes apart."""
    sys.path.insert(0, os.path.dirname(__file__))
    import make_unicode_tables as mut
    prev, cps = -1, []
    for c in range(0x110000):
        if 0xD800 <= c <= 0xDFFF:
            continue
        k = mut.char_class(c)
        if k != prev:
            cps += [c - 1, c, c + 1]
            prev = k
    cps = sorted(set(c for c in cps if 0 <= c < 0x110000 and not 0xD800 <= c <= 0xDFFF))
    recs = []
    for i in range(0, len(cps), 64):
        recs.append("".join("a" + chr(c) + "a 1" + chr(c) + "2 !" + chr(c) + "\n" + chr(c) + chr(c) + " " for c in cps[i:i + 64]))
    return recs


def build_corpus():
    recs = []
    makers = [(english_qa, 700), (chinese_qa, 500), (other_langs, 250), (snippet_mix, 400), (whitespace_cases, 500),
              (random_string, 300), (long_runs, 30)]
    for fn, count in makers:
        recs += [fn() for _ in range(count)]
    recs += table_sweep()
    recs += ["", " ", "\n", "a", "<|eot_id|>", "<|begin_of_text|>Hello", "Hello<|end_of_text|>"]
    R.shuffle(recs)
    return recs


# ---------------------------------------------------------------------------------------------

def save_safetensors(tensors, path, metadata):
    """safetensors with keys in sorted order, so that a rerun writes the same bytes (the library's
    writer orders __metadata__ by hash); widest dtypes first, as the library does, so that every
    tensor is aligned to its element size."""
    dtypes = {np.dtype(np.uint8): "U8", np.dtype(np.uint16): "U16", np.dtype(np.int32): "I32", np.dtype(np.int64): "I64"}
    header, blobs, off = {"__metadata__": dict(sorted(metadata.items()))}, [], 0
    for name in sorted(tensors, key=lambda k: (-tensors[k].dtype.itemsize, k)):
        a = np.ascontiguousarray(tensors[name])
        header[name] = {"dtype": dtypes[a.dtype], "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        blobs.append(a.astype(a.dtype.newbyteorder("<")).tobytes())
        off += a.nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def main():
    ranks = load_tiktoken_bpe(os.path.join(ROOT, "weights/llama3/tokenizer.model"))
    hf = tokenizers.Tokenizer.from_file(os.path.join(ROOT, "weights/llama3/tokenizer.json"))
    specials = {t.content: i for i, t in hf.get_added_tokens_decoder().items()}
    assert len(specials) == 256 and min(specials.values()) == len(ranks) == 128000
    enc = tiktoken.Encoding("llama3", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    pre = hf.pre_tokenizer

    recs = build_corpus()
    texts = [r.encode("utf-8") for r in recs]
    total = sum(len(t) for t in texts)
    assert total >= 1_000_000, total

    ids, plain_recs, plain_ids, piece_lens = [], [], [], []
    for i, r in enumerate(recs):
        a = enc.encode(r, allowed_special="all")
        b = hf.encode(r, add_special_tokens=False).ids
        assert a == b, f"record {i}: tiktoken and tokenizers disagree: {r[:80]!r}"
        assert hf.encode(r).ids == [128000] + b, f"record {i}: add_special_tokens=True is not BOS + ids"
        ids.append(a)
        if any(s in r for s in specials):
            pa = enc.encode_ordinary(r)
            hf.encode_special_tokens = True
            pb = hf.encode(r, add_special_tokens=False).ids
            hf.encode_special_tokens = False
            assert pa == pb, f"record {i}: specials as text: tiktoken and tokenizers disagree"
            plain_recs.append(i)
            plain_ids.append(pa)
        # the pre-tokenizer's pieces alone (special tokens not split), as byte lengths
        lens = [len(piece_text.encode("utf-8")) for piece_text, _ in
                ((r[s:e], None) for _, (s, e) in pre.pre_tokenize_str(r))]
        assert sum(lens) == len(texts[i]) and max(lens, default=0) < 65536
        piece_lens.append(lens)

    # decoding random ids: bytes that do not form UTF-8 become U+FFFD the same way in both
    dec_ids, dec_text, dec_skip = [], [], []
    for k in range(600):
        n = R.randint(1, 24)
        seq = [R.randrange(128256) if R.random() < 0.9 else R.randrange(128000, 128256) for _ in range(n)]
        if k % 3 == 0:  # split multi-byte characters across tokens more often: single-byte tokens
            seq = [R.choice(list(range(128, 256)) + [ranks[bytes([b])] for b in range(0x80, 0x100)]) for _ in range(n)]
        t1 = enc.decode(seq, errors="replace")
        t2 = hf.decode(seq, skip_special_tokens=False)
        assert t1 == t2, f"decode {seq}: tiktoken {t1!r} != tokenizers {t2!r}"
        dec_ids.append(seq)
        dec_text.append(t1.encode("utf-8"))
        dec_skip.append(hf.decode(seq, skip_special_tokens=True).encode("utf-8"))

    def cat_i32(rows):
        flat = np.array([x for r in rows for x in r], dtype=np.int32)
        off = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)
        return flat, off

    def cat_u8(rows):
        flat = np.frombuffer(b"".join(rows), dtype=np.uint8).copy()
        off = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)
        return flat, off

    t = {}
    t["text"], t["text_offsets"] = cat_u8(texts)
    t["ids"], t["ids_offsets"] = cat_i32(ids)
    t["plain_records"] = np.array(plain_recs, dtype=np.int32)
    t["plain_ids"], t["plain_offsets"] = cat_i32(plain_ids)
    t["piece_lens"], t["piece_offsets"] = cat_i32(piece_lens)
    t["piece_lens"] = t["piece_lens"].astype(np.uint16)
    t["dec_ids"], t["dec_offsets"] = cat_i32(dec_ids)
    t["dec_text"], t["dec_text_offsets"] = cat_u8(dec_text)
    t["dec_skip_text"], t["dec_skip_offsets"] = cat_u8(dec_skip)
    meta = {"generator": "tests/ref/make_tokenizer_fixtures.py", "tiktoken": tiktoken.__version__,
            "tokenizers": tokenizers.__version__, "records": str(len(recs)), "bytes": str(total),
            "tokens": str(len(t["ids"]))}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_safetensors(t, OUT, meta)
    print(f"{OUT}: {len(recs)} records, {total} bytes, {len(t['ids'])} tokens; "
          f"{len(plain_recs)} records with special-token text; {len(dec_ids)} decode cases; "
          f"tiktoken == tokenizers on all; file {os.path.getsize(OUT)} bytes")


if __name__ == "__main__":
    main()
