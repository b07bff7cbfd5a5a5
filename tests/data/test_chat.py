"""Chat templates (medvl_jax.data.chat) against Hugging Face's Jinja chat-template rendering.

Each family's template is written here in Jinja from its documented format and rendered by
transformers' ``apply_chat_template``; token ids are checked against tokenising that text.
"""
import numpy as np
import pytest

from medvl_jax.data import chat
from medvl_jax.data import tokenizer as tok
from medvl_jax.data.errors import DataError

# Gemma 3: <bos>, the system message folded into the first user turn, roles must alternate,
# contents trimmed, the assistant is called "model".
GEMMA_JINJA = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2: ChatML with a default system message when the conversation has none.
QWEN2_JINJA = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 3 (3.0 Instruct): bos before the first header, contents trimmed.
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

JINJA = {"gemma": GEMMA_JINJA, "chatml": CHATML_JINJA, "qwen2": QWEN2_JINJA,
         "llama3": LLAMA3_JINJA}
BOS = {"gemma": "<bos>", "chatml": "<bos>", "qwen2": "<bos>", "llama3": "<|begin_of_text|>"}
EOT = {"gemma": "<end_of_turn>", "chatml": "<|im_end|>", "qwen2": "<|im_end|>",
       "llama3": "<|eot_id|>"}
STRIPS = {"gemma": True, "chatml": False, "qwen2": False, "llama3": True}
TEMPLATES = sorted(JINJA)

SENTENCES = [
    "The heart size is normal. No pleural effusion or pneumothorax.",
    "There is a 12 mm nodule in the right upper lobe.",
    "You are a helpful assistant. You are a careful radiologist.",
    "What is the size of the nodule? Describe the findings of this chest radiograph.",
    "user model assistant system",
    "Is there a pneumothorax? No. Which side is the effusion on? Left.",
    "Compare the current study with the prior one: the opacity has improved.",
]

SYSTEM = {"role": "system", "content": "You are a careful radiologist."}
CONVERSATIONS = {
    "single": [
        {"role": "user", "content": "<image>\nDescribe the findings."},
        {"role": "assistant", "content": "The heart size is normal. No pleural effusion."},
    ],
    "single_system": [
        SYSTEM,
        {"role": "user", "content": "<image>\nWhat is the size of the nodule?"},
        {"role": "assistant", "content": "There is a 12 mm nodule in the right upper lobe."},
    ],
    "multi": [
        {"role": "user", "content": "<image> Is there a pneumothorax?"},
        {"role": "assistant", "content": "No."},
        {"role": "user", "content": "  Which side is the effusion on?\n"},
        {"role": "assistant", "content": "Left, about 35 mm deep. \n"},
    ],
    "multi_system_two_images": [
        SYSTEM,
        {"role": "user", "content": "Prior: <image>\nCurrent: <image>\nCompare them."},
        {"role": "assistant", "content": "The opacity has improved."},
        {"role": "user", "content": "Any new nodule? Größe in mm — 肺?"},
        {"role": "assistant", "content": "No new nodule (0 mm)."},
    ],
    "text_only": [
        {"role": "user", "content": "What does pneumothorax mean?"},
        {"role": "assistant", "content": "Air in the pleural space."},
    ],
}


def n_images(messages):
    return sum(m["content"].count("<image>") for m in messages if m["role"] != "assistant")


@pytest.fixture(scope="module")
def tokenizer():
    return tok.train_bpe_tokenizer(SENTENCES * 5, vocab_size=360)


def hf_render(tokenizer, template, messages, add_generation_prompt):
    tokenizer.chat_template = JINJA[template]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             bos_token=BOS[template])
    finally:
        tokenizer.chat_template = None


def reference_ids(tokenizer, text, counts):
    """Tokenises the whole text, then expands the i-th <image> id into counts[i] copies."""
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    out, k = [], 0
    for i in tokenizer(text, add_special_tokens=False)["input_ids"]:
        if i == image_id:
            out += [image_id] * counts[k]
            k += 1
        else:
            out.append(i)
    assert k == len(counts)
    return out


# --------------------------------------------------------------------------------------------
# render
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_render_matches_hf_jinja(tokenizer, template, name):
    messages = CONVERSATIONS[name]
    assert chat.render(messages, template) == hf_render(tokenizer, template, messages, False)
    prompt = messages[:-1]
    assert (chat.render(prompt, template, add_generation_prompt=True)
            == hf_render(tokenizer, template, prompt, True))
    assert chat.assistant_prompt(messages, template) == hf_render(tokenizer, template, prompt,
                                                                  True)


def test_render_gemma_folds_system_into_first_user_turn():
    text = chat.render(CONVERSATIONS["single_system"], "gemma")
    assert text.startswith("<bos><start_of_turn>user\nYou are a careful radiologist.\n\n<image>\n")
    assert "<start_of_turn>system" not in text


def test_render_rejects_bad_roles():
    with pytest.raises(DataError, match="alternate") as e:
        chat.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                    "gemma")
    assert e.value.reason == "messages"
    with pytest.raises(DataError, match="role 'doctor'"):
        chat.render([{"role": "doctor", "content": "a"}], "chatml")
    with pytest.raises(DataError, match="no user message"):
        chat.render([SYSTEM], "llama3")
    with pytest.raises(ValueError, match="unknown chat template"):
        chat.render(CONVERSATIONS["single"], "vicuna")


# --------------------------------------------------------------------------------------------
# encode
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_encode_matches_tokenised_render(tokenizer, template, name):
    messages = CONVERSATIONS[name]
    k = n_images(messages)
    enc = chat.encode(tokenizer, messages, template, num_image_tokens=4, num_images=k)
    text = hf_render(tokenizer, template, messages, False)
    assert enc.tokens.dtype == np.int32 and enc.tokens.shape == enc.loss_mask.shape
    assert enc.tokens.tolist() == reference_ids(tokenizer, text, [4] * k)
    assert enc.num_images == k
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert int((enc.tokens == image_id).sum()) == 4 * k
    assert (enc.mask_ar == 1).all()


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_loss_mask_is_answers_and_end_of_turn(tokenizer, template, name):
    messages = CONVERSATIONS[name]
    enc = chat.encode(tokenizer, messages, template, num_image_tokens=2,
                      num_images=n_images(messages))
    answers = [m["content"].strip() if STRIPS[template] else m["content"]
               for m in messages if m["role"] == "assistant"]
    # Each contiguous run of loss tokens is one answer followed by its end-of-turn marker.
    runs, start = [], None
    for i, v in enumerate(enc.loss_mask.tolist() + [0]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs.append(enc.tokens[start:i].tolist())
            start = None
    assert [tokenizer.decode(r) for r in runs] == [a + EOT[template] for a in answers]
    assert all(r[-1] == tokenizer.convert_tokens_to_ids(EOT[template]) for r in runs)


@pytest.mark.parametrize("template", TEMPLATES)
def test_prefix_lm_boundary(tokenizer, template):
    messages = CONVERSATIONS["multi_system_two_images"]
    enc = chat.encode(tokenizer, messages, template, num_image_tokens=3, num_images=2,
                      prefix_lm=True)
    # The prefix is the prompt of the first answer: first user turn + generation prompt.
    first_prompt = messages[:2]
    prefix = reference_ids(tokenizer, hf_render(tokenizer, template, first_prompt, True), [3, 3])
    assert enc.tokens[:len(prefix)].tolist() == prefix
    assert (enc.mask_ar[:len(prefix)] == 0).all() and (enc.mask_ar[len(prefix):] == 1).all()
    assert enc.loss_mask[len(prefix)] == 1 and (enc.loss_mask[:len(prefix)] == 0).all()


def test_per_image_token_counts(tokenizer):
    messages = CONVERSATIONS["multi_system_two_images"]
    enc = chat.encode(tokenizer, messages, "gemma", num_image_tokens=[2, 5], num_images=2)
    text = hf_render(tokenizer, "gemma", messages, False)
    assert enc.tokens.tolist() == reference_ids(tokenizer, text, [2, 5])
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, enc.tokens == image_id, 0])))[::2]
    assert runs.tolist() == [2, 5]
    with pytest.raises(ValueError, match="entries"):
        chat.encode(tokenizer, messages, "gemma", num_image_tokens=[2], num_images=2)


def test_custom_image_token(tokenizer):
    # The image expands to another token (here <pad>, just to use a different id).
    messages = CONVERSATIONS["single"]
    enc = chat.encode(tokenizer, messages, "gemma", num_image_tokens=3, num_images=1,
                      image_token="<pad>")
    assert int((enc.tokens == tokenizer.pad_token_id).sum()) == 3
    assert int((enc.tokens == tokenizer.convert_tokens_to_ids("<image>")).sum()) == 0
    with pytest.raises(ValueError, match="image_soft_token"):
        chat.encode(tokenizer, messages, "gemma", num_image_tokens=3, num_images=1,
                    image_token="<image_soft_token>")


@pytest.mark.parametrize("template", TEMPLATES)
def test_generation_prompt(tokenizer, template):
    messages = CONVERSATIONS["multi"]
    enc = chat.encode_prompt(tokenizer, messages, template, num_image_tokens=2, num_images=1,
                             prefix_lm=True)
    text = hf_render(tokenizer, template, messages[:-1], True)
    assert enc.tokens.tolist() == reference_ids(tokenizer, text, [2])
    assert (enc.loss_mask == 0).all()  # Earlier answers are history, not targets.
    # prefix-LM: the prefix still ends where the first assistant turn opens.
    first = len(reference_ids(tokenizer, hf_render(tokenizer, template, messages[:1], True), [2]))
    assert (enc.mask_ar[:first] == 0).all() and (enc.mask_ar[first:] == 1).all()
    single = chat.encode_prompt(tokenizer, CONVERSATIONS["single"], template,
                                num_image_tokens=2, num_images=1, prefix_lm=True)
    assert (single.mask_ar == 0).all() and (single.loss_mask == 0).all()
    same = chat.encode(tokenizer, messages[:-1], template, num_image_tokens=2, num_images=1,
                       add_generation_prompt=True)
    assert same.tokens.tolist() == enc.tokens.tolist()
    with pytest.raises(DataError, match="ending with a user message"):
        chat.encode(tokenizer, messages, template, num_image_tokens=2, num_images=1,
                    add_generation_prompt=True)
    with pytest.raises(DataError, match="must end with an assistant"):
        chat.encode(tokenizer, messages[:-1], template, num_image_tokens=2, num_images=1)


def test_end_of_turn_token():
    assert [chat.end_of_turn_token(t) for t in TEMPLATES] == [EOT[t] for t in TEMPLATES]


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------

def _encode(tokenizer, messages, num_images, **kw):
    return chat.encode(tokenizer, messages, "gemma", num_image_tokens=4, num_images=num_images,
                       where="rec-7", **kw)


@pytest.mark.parametrize("messages,num_images,found", [
    (CONVERSATIONS["text_only"], 1, 0),   # images given, no placeholder: never inserted
    (CONVERSATIONS["single"], 0, 1),      # more placeholders than images
    (CONVERSATIONS["single"], 2, 1),      # fewer placeholders than images
    (CONVERSATIONS["multi_system_two_images"], 1, 2),
])
def test_placeholder_count_errors(tokenizer, messages, num_images, found):
    with pytest.raises(DataError) as e:
        _encode(tokenizer, messages, num_images)
    assert e.value.reason == "image_placeholders" and e.value.where == "rec-7"
    assert f"found {found}" in str(e.value) and f"{num_images} images" in str(e.value)
    assert "rec-7" in str(e.value)


def test_placeholder_in_answer_is_an_error(tokenizer):
    messages = [{"role": "user", "content": "<image> Findings?"},
                {"role": "assistant", "content": "See <image>."}]
    with pytest.raises(DataError, match="assistant") as e:
        _encode(tokenizer, messages, 1)
    assert e.value.reason == "image_placeholders"


@pytest.mark.parametrize("answer", ["", "   \n\t"])
def test_empty_answer(tokenizer, answer):
    messages = [{"role": "user", "content": "Findings?"}, {"role": "assistant", "content": answer}]
    with pytest.raises(DataError) as e:
        _encode(tokenizer, messages, 0)
    assert e.value.reason == "empty_answer" and e.value.where == "rec-7"


def test_missing_template_marker(tokenizer):
    gemma_only = tok.train_bpe_tokenizer(
        SENTENCES, vocab_size=300,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<image>", "<start_of_turn>",
                        "<end_of_turn>"])
    chat.encode(gemma_only, CONVERSATIONS["single"], "gemma", num_image_tokens=1, num_images=1)
    with pytest.raises(ValueError, match=r"<\|im_start\|>"):
        chat.encode(gemma_only, CONVERSATIONS["single"], "chatml", num_image_tokens=1,
                    num_images=1)
    with pytest.raises(ValueError, match=r"<\|begin_of_text\|>"):
        chat.encode(gemma_only, CONVERSATIONS["single"], "llama3", num_image_tokens=1,
                    num_images=1)


def test_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="truncation"):
        _encode(tokenizer, CONVERSATIONS["single"], 1, truncation="left")
    with pytest.raises(DataError, match="list") as e:
        _encode(tokenizer, "hello", 0)
    assert e.value.reason == "messages"
    with pytest.raises(DataError, match="content must be a string"):
        _encode(tokenizer, [{"role": "user", "content": None}], 0)


# --------------------------------------------------------------------------------------------
# too long / truncation
# --------------------------------------------------------------------------------------------

def test_too_long_error_names_record_and_lengths(tokenizer):
    messages = CONVERSATIONS["single"]
    n = len(_encode(tokenizer, messages, 1).tokens)
    assert len(_encode(tokenizer, messages, 1, max_length=n).tokens) == n
    with pytest.raises(DataError) as e:
        _encode(tokenizer, messages, 1, max_length=n - 1)
    assert e.value.reason == "too_long"
    assert "rec-7" in str(e.value) and str(n) in str(e.value) and str(n - 1) in str(e.value)


@pytest.mark.parametrize("template", TEMPLATES)
def test_right_truncation_cuts_only_the_answer(tokenizer, template):
    messages = CONVERSATIONS["single"]
    kw = dict(num_image_tokens=6, num_images=1, prefix_lm=True)
    full = chat.encode(tokenizer, messages, template, **kw)
    prompt = reference_ids(tokenizer, hf_render(tokenizer, template, messages[:1], True), [6])
    p = len(prompt)
    for max_length in (p + 1, p + 3, len(full.tokens) - 1):
        cut = chat.encode(tokenizer, messages, template, max_length=max_length,
                          truncation="right", **kw)
        assert len(cut.tokens) == max_length
        assert cut.tokens.tolist() == full.tokens[:max_length].tolist()
        assert cut.tokens[:p].tolist() == prompt  # Prompt and all image tokens intact.
        assert cut.loss_mask.tolist() == full.loss_mask[:max_length].tolist()
        assert cut.mask_ar.tolist() == full.mask_ar[:max_length].tolist()
        assert cut.loss_mask[p:].all()
    # No room for a single answer token: still an error.
    for max_length in (p, p - 1):
        with pytest.raises(DataError, match="must be kept") as e:
            chat.encode(tokenizer, messages, template, max_length=max_length,
                        truncation="right", where="rec-9", **kw)
        assert e.value.reason == "too_long" and e.value.where == "rec-9"


def test_right_truncation_never_cuts_later_images(tokenizer):
    messages = [
        {"role": "user", "content": "<image> Findings?"},
        {"role": "assistant", "content": "The heart size is normal."},
        {"role": "user", "content": "And now? <image>"},
        {"role": "assistant", "content": "No pleural effusion."},
    ]
    kw = dict(num_image_tokens=3, num_images=2, truncation="right")
    full = chat.encode(tokenizer, messages, "chatml", num_image_tokens=3, num_images=2)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    last_image = int(np.flatnonzero(full.tokens == image_id)[-1])
    # A cut after the second image is fine; it spans the rest of the conversation.
    ok = chat.encode(tokenizer, messages, "chatml", max_length=last_image + 1, **kw)
    assert ok.tokens.tolist() == full.tokens[:last_image + 1].tolist()
    assert int((ok.tokens == image_id).sum()) == 6
    # A cut through the second image is not.
    with pytest.raises(DataError, match="image") as e:
        chat.encode(tokenizer, messages, "chatml", max_length=last_image, **kw)
    assert e.value.reason == "too_long"


def test_generation_prompt_too_long(tokenizer):
    messages = CONVERSATIONS["single"][:1]
    n = len(chat.encode(tokenizer, messages, "gemma", num_image_tokens=4, num_images=1,
                        add_generation_prompt=True).tokens)
    with pytest.raises(DataError) as e:
        chat.encode(tokenizer, messages, "gemma", num_image_tokens=4, num_images=1,
                    add_generation_prompt=True, max_length=n - 1, truncation="right")
    assert e.value.reason == "too_long"
