"""The model outputs of the scoring conformance suite (inputs only): realistic answers to
questions of each dataset (bare words, sentences, <think>/<answer> reasoning, complete and
cut-off \\boxed{}, option letters in every common wrapping, numbers as digits and words,
trailing punctuation and spaces, empty outputs, Chinese SLAKE answers).

    python conformance_outputs.py            # writes records.jsonl

The verdicts are added by conformance_verdicts.py, which runs the original scoring code.
Not collected by pytest; kept to show how scoring_conformance.jsonl was made."""
import json

records = []


def add(dataset, **rec):
    rec = {"dataset": dataset, **rec}
    rec["id"] = f"{dataset}/{sum(r['dataset'] == dataset for r in records):03d}"
    records.append(rec)


def yes_no_responses(ans):
    """Responses to a yes/no question whose reference is ans (any case)."""
    a = ans.lower()
    other = "no" if a == "yes" else "yes"
    A = a.capitalize()
    return [
        a, A, A + ".", a + "\n", " " + A, A + " ", other, other.capitalize() + ".",
        f"{A}, there is.", f"{A}, it is.",
        f"The answer is {A}.", f"The answer is: {a}", f"Answer: {A}",
        f"**Answer**: {A}", f"Final answer: {a}",
        f"\\boxed{{{A}}}", f"\\boxed{{{a}}}.", f"The result is \\boxed{{{A}",
        f"<think>Looking at the image, the finding is visible.</think>\n<answer>{A}</answer>",
        f"<think>The lungs look clear.</think><answer>{other}</answer>",
        f"<answer>{A}</answer> <answer>{other}</answer>",
        f"<think>Let me check.</think>\n<answer>{A}",
        "Yes, no abnormality is seen.", "normal", "unknown", "none", "Not seen.",
        "There is no evidence of pneumothorax.", "YES", "NO.", "",
        "I cannot determine this from the image.", f"{A}\n\nThe image shows it clearly.",
        f"答案: {a}", f"{A}. The mass is in the left lung.",
        f"**{A}**", f"the answer is {a}, the answer is {other}",
    ]


def open_responses(ans, extra=()):
    A = ans[:1].upper() + ans[1:]
    return [
        ans, A, A + ".", " " + ans, ans + "\n", f"The answer is {ans}.",
        f"Answer: {A}", f"\\boxed{{{ans}}}", f"\\boxed{{{A}",
        f"<think>Reasoning about the image.</think><answer>{ans}</answer>",
        f"It is {ans}.", f"{A} is seen in the image.", "", "left", *extra,
    ]


# ------------------------------------------------------------------------------------------
# VQA-RAD (HF flaviagiammarino/vqa-rad: lower-case answers) and PathVQA.
vqa_rad_refs = [
    ("Is there evidence of a pneumothorax?", "no"),
    ("Is the heart enlarged?", "yes"),
    ("Is this an MRI?", "no"),
    ("Where is the lesion located?", "right lower lobe"),
    ("What imaging modality was used?", "ct"),
    ("How many kidneys are visible?", "2"),
    ("Which side is the effusion on?", "left"),
    ("What organ is shown?", "brain"),
]
for q, a in vqa_rad_refs:
    if a in ("yes", "no"):
        resps = yes_no_responses(a)
    else:
        extra = {"2": ["two", "2 kidneys", "Two."], "ct": ["CT", "CT scan", "Computed tomography"],
                 "left": ["Left side", "LEFT", "left."],
                 "right lower lobe": ["Right lower lobe.", "RLL", "right lower lobe of the lung"],
                 "brain": ["Brain", "The brain", "brain."]}[a]
        resps = open_responses(a, extra)
    for r in resps:
        add("vqa_rad", question=q, answer=a, response=r)

path_refs = [("Is there fibrosis?", "yes"), ("Does this image show necrosis?", "no"),
             ("What is present?", "fibrin"), ("How is the tissue stained?", "hematoxylin and eosin")]
for q, a in path_refs:
    resps = yes_no_responses(a) if a in ("yes", "no") else open_responses(
        a, ["Fibrin deposits", "H&E", "hematoxylin-eosin"])
    for r in resps[::2] if a in ("yes", "no") else resps:
        add("pathvqa", question=q, answer=a, response=r)

# ------------------------------------------------------------------------------------------
# SLAKE (test.json: answers as written, "Yes"/"No" capitalised; en and zh).
slake_refs = [
    ("Does the picture contain liver?", "Yes", "CLOSED", "en"),
    ("Is this a T2 weighted image?", "No", "CLOSED", "en"),
    ("Which is the biggest in this image, lung, liver or heart?", "Lung", "CLOSED", "en"),
    ("What modality is used to take this image?", "MRI", "CLOSED", "en"),
    ("Where is the abnormality?", "Left Lung, Right", "OPEN", "en"),
    ("What organ is this?", "Brain", "OPEN", "en"),
    ("What is the largest organ in the picture?", "Liver", "OPEN", "en"),
    ("How many lungs are there?", "2", "OPEN", "en"),
    ("图中有肝脏吗?", "是", "CLOSED", "zh"),
    ("这张图片是CT吗?", "否", "CLOSED", "zh"),
    ("图中最大的器官是什么?", "肺", "OPEN", "zh"),
    ("病变在哪里?", "左肺", "OPEN", "zh"),
]
for q, a, t, lang in slake_refs:
    if a in ("Yes", "No"):
        resps = yes_no_responses(a)[::2] + ["Yes.\n", "yes"]
    elif lang == "zh":
        resps = [a, a + "。", a + ".", " " + a, f"答案: {a}", f"答案：{a}", f"\\boxed{{{a}}}",
                 f"<answer>{a}</answer>", "", f"{a}\n", "是的", "yes" if a == "是" else "不是"]
    else:
        extra = {"Lung": ["lung", "The lung", "Lung.", "lungs"], "MRI": ["MRI.", "mri", "MR", "MRI scan"],
                 "Left Lung, Right": ["left lung, right", "Left lung", "Left Lung, Right."],
                 "Brain": ["brain", "The brain."], "Liver": ["liver", "Liver\n"],
                 "2": ["two", "2.", "Two lungs"]}[a]
        resps = open_responses(a, extra)
    for r in resps:
        add("slake", question=q, answer=a, answer_type=t, lang=lang, response=r)

# ------------------------------------------------------------------------------------------
# Multiple choice: letters in every wrapping.
def choice_responses(letter, text, wrong_letter, wrong_text):
    L, l = letter, letter.lower()
    return [
        L, l, f"{L}.", f"({L})", f"{L})", f"**{L}**", f"\\boxed{{{L}}}", f"\\boxed{{({L})}}",
        f"\\boxed{{{L}", f"{L}. {text}", f"{L}: {text}", f"({L}) {text}", text, text.lower(),
        f"The answer is {L}.", f"The answer is ({L}).", f"Answer: {L}", f"Answer: ({L})",
        f"**Answer**: {L}", f"<think>Considering the options.</think><answer>{L}</answer>",
        f"<think>Considering the options.</think>\n<answer>{L}. {text}</answer>",
        f"I think the answer is {L}, {text}.", f"{wrong_letter}", f"({wrong_letter})",
        wrong_text, f"Option {L}", "", f"{L}\n\nThe image shows {text.lower()}.",
        f"The correct option is {L}.\n\n{L}", f"{L} or {wrong_letter}", f"最终答案: {L}",
    ]


pmc_refs = [
    ("What is the uptake pattern in the breast?",
     ["A:Diffuse uptake pattern", "B:Focal uptake pattern", "C:No uptake pattern",
      "D:Cannot determine from the information given"], "B"),
    ("Which imaging modality was used?",
     [" A:CT scan ", " B:MRI ", " C:Ultrasound ", " D:PET "], "C"),
]
for q, choices, letter in pmc_refs:
    i = "ABCD".index(letter)
    text = choices[i].split(":", 1)[1].strip()
    wl = "A" if letter != "A" else "D"
    wt = choices["ABCD".index(wl)].split(":", 1)[1].strip()
    for r in choice_responses(letter, text, wl, wt):
        add("pmc_vqa", question=q, choices=choices, answer=letter, response=r)

omni_refs = [
    ("What modality is used in this image?", ["CT", "MRI", "X-Ray", "Ultrasound"], "MRI",
     "Modality Recognition", "MR"),
    ("Which disease is shown?", ["Pneumonia", "Normal", "Tuberculosis"], "Tuberculosis",
     "Disease Diagnosis", "X-Ray"),
]
for q, opts, gt, qtype, modality in omni_refs:
    i = opts.index(gt)
    letter = "ABCD"[i]
    wl = "A" if letter != "A" else "B"
    for r in choice_responses(letter, gt, wl, opts["ABCD".index(wl)]):
        add("omnimedvqa", question=q, options=opts, gt_answer=gt, question_type=qtype,
            modality_type=modality, response=r)

mmmu_refs = [
    ("<image 1> Which chamber is marked by the arrow?",
     ["Right Atrium", "Left Atrium", "Right Ventricle", "Left Ventricle"], "C"),
    ("A 45-year-old man presents with chest pain. <image 1> What is the most likely diagnosis?",
     ["Aortic dissection", "Myocardial infarction", "Pulmonary embolism", "Pericarditis",
      "Pneumothorax"], "A"),
]
for q, opts, letter in mmmu_refs:
    i = "ABCDE".index(letter)
    wl = "B" if letter != "B" else "A"
    resps = choice_responses(letter, opts[i], wl, opts["ABCDE".index(wl)])
    resps += [f"The most likely answer here is {opts[i].lower()} based on the findings.",
              f"Looking at the image carefully, I believe it is {opts[i]} rather than "
              f"{opts['ABCDE'.index(wl)]}."]
    for r in resps:
        add("mmmu_med", question=q, options=opts, answer=letter, question_type="multiple-choice",
            response=r)
for q, a in [("What is the heart rate in beats per minute?", "75"),
             ("Which nerve is injured?", "radial nerve")]:
    for r in [a, f"The answer is {a}.", f"\\boxed{{{a}}}", "75 bpm" if a == "75" else "Radial",
              "seventy-five", f"It is {a}", ""]:
        add("mmmu_med", question=q, options=[], answer=a, question_type="open", response=r)

# ------------------------------------------------------------------------------------------
# LLaVA-Med (run_eval.py and run_eval_batch.py): answer_type from the dataset.
llava_refs = [
    ("Is there a pneumothorax?", "no", "CLOSED"),
    ("Is the heart enlarged?", "Yes", "CLOSED"),
    ("Is this image taken with MRI or CT?", "CT", "CLOSED"),
    ("Where is the lesion?", "right upper lobe", "OPEN"),
    ("What organ is shown?", "Brain", "OPEN"),
    ("How many nodules are there?", "two", "OPEN"),
    ("What abnormality is seen?", "pleural effusion", "OPEN"),
]
for q, a, t in llava_refs:
    if t == "CLOSED" and a.lower() in ("yes", "no"):
        resps = yes_no_responses(a)
    elif t == "CLOSED":
        resps = ["CT", "ct.", "It is a CT scan.", "Yes, CT", "No, MRI", "MRI", "CT, not MRI",
                 "computed tomography", "", "CT-scan", "(CT)", "Yes."]
    else:
        A = a[:1].upper() + a[1:]
        resps = [a, A + ".", f"The lesion is in the {a}.", f"{A} {a}", f"left {a}", "", "2",
                 "Two nodules are seen.", "There is a large pleural-effusion on the left.",
                 "The brain, the brain.", "none", "The (right) upper-lobe", "effusion",
                 "Pleural effusion. " + "Finding. " * 40 + "Pleural effusion.",
                 "There is no effusion. " * 3, "1,000 mm brain",
                 "Finding. " * 70 + "Pleural effusion.", "Finding. " * 20 + "Pleural effusion.",
                 "Finding. " * 31 + "Brain.", "Fin. " * 40 + "right upper lobe."]
    for r in resps:
        add("llava_med", question=q, answer=a, answer_type=t, response=r)

with open("records.jsonl", "w") as f:
    for r in records:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
from collections import Counter
print(len(records), Counter(r["dataset"] for r in records))
