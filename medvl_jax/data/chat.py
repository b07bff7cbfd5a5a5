"""Chat templates that produce model inputs directly: token ids, prefix-LM and loss masks.

Conversations are lists of ``{"role": "system" | "user" | "assistant", "content": str}``: an
optional system message first, then user and assistant turns alternating, starting with a user
turn. Prompt messages (system, user) may contain the image placeholder ``"<image>"``.

Templates (``template=``), matching the text of the model families' own chat templates:

``gemma``   ``<bos><start_of_turn>user\\n{user}<end_of_turn>\\n<start_of_turn>model\\n{answer}``
            ``<end_of_turn>\\n``. Contents are stripped of surrounding whitespace. A system
            message is folded into the first user turn as ``{system}\\n\\n{user}`` (Gemma 3).
``chatml``  ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, contents as they are.
            No system message is inserted when there is none.
``qwen2``   ``chatml`` plus Qwen2's default: when the conversation has no system message,
            ``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n`` comes first.
``llama3``  ``<|begin_of_text|>`` then ``<|start_header_id|>{role}<|end_header_id|>\\n\\n``
            ``{content}<|eot_id|>`` per message, contents stripped (Llama 3.0; no date header).

With ``add_generation_prompt`` the text ends with the opening of an assistant turn
(``<start_of_turn>model\\n``, ``<|im_start|>assistant\\n``, or the llama3 assistant header).

:func:`encode` tokenises the template piece by piece rather than the rendered string, so the
masks fall exactly on token boundaries: markers are looked up as single special tokens, prompt
text runs and each answer are tokenised separately, and each ``<image>`` becomes the image
token repeated. For tokenizers that split text at whitespace before merging (byte-level BPE,
the Llama 3 and Qwen2 tokenizers) the ids equal those of tokenising :func:`render`'s text,
image expansion aside — except, possibly, where an answer itself starts with whitespace (only
``chatml``/``qwen2`` keep it): a merge across the answer's start is never made, by design.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from medvl_jax.data.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
QWEN2_DEFAULT_SYSTEM = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One tokenised conversation.

    Attributes:
      tokens: int32 ``[L]`` token ids (image placeholders expanded to image tokens).
      mask_ar: int32 ``[L]``: 0 = prefix token (may attend bidirectionally in a prefix-LM),
        1 = causal.
      loss_mask: int32 ``[L]``: 1 on the tokens a model is trained to predict: the content of
        every assistant message and the end-of-turn marker that closes it. All 0 for a
        generation prompt (``add_generation_prompt=True``), earlier answers included.
      num_images: number of images the tokens refer to.
    """
    tokens: np.ndarray
    mask_ar: np.ndarray
    loss_mask: np.ndarray
    num_images: int


@dataclasses.dataclass(frozen=True)
class _Piece:
    """A piece of a rendered conversation: a marker (one special token) or text."""
    text: str
    marker: bool = False
    loss: bool = False  # Part of an assistant answer: content or its closing marker.


def _gemma(messages: list[dict], add_generation_prompt: bool) -> list[_Piece]:
    out = [_Piece("<bos>", marker=True)]
    system = ""
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"] + "\n\n", messages[1:]
    for i, m in enumerate(messages):
        answer = m["role"] == "assistant"
        out += [_Piece("<start_of_turn>", marker=True),
                _Piece(("model" if answer else m["role"]) + "\n" + (system if i == 0 else "")),
                _Piece(m["content"].strip(), loss=answer),
                _Piece("<end_of_turn>", marker=True, loss=answer),
                _Piece("\n")]
    if add_generation_prompt:
        out += [_Piece("<start_of_turn>", marker=True), _Piece("model\n")]
    return out


def _chatml(messages: list[dict], add_generation_prompt: bool,
            default_system: str | None = None) -> list[_Piece]:
    out = []
    if default_system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": default_system}] + messages
    for m in messages:
        answer = m["role"] == "assistant"
        out += [_Piece("<|im_start|>", marker=True),
                _Piece(m["role"] + "\n"),
                _Piece(m["content"], loss=answer),
                _Piece("<|im_end|>", marker=True, loss=answer),
                _Piece("\n")]
    if add_generation_prompt:
        out += [_Piece("<|im_start|>", marker=True), _Piece("assistant\n")]
    return out


def _qwen2(messages: list[dict], add_generation_prompt: bool) -> list[_Piece]:
    return _chatml(messages, add_generation_prompt, default_system=QWEN2_DEFAULT_SYSTEM)


def _llama3_header(role: str) -> list[_Piece]:
    return [_Piece("<|start_header_id|>", marker=True), _Piece(role),
            _Piece("<|end_header_id|>", marker=True), _Piece("\n\n")]


def _llama3(messages: list[dict], add_generation_prompt: bool) -> list[_Piece]:
    out = [_Piece("<|begin_of_text|>", marker=True)]
    for m in messages:
        answer = m["role"] == "assistant"
        out += _llama3_header(m["role"])
        out += [_Piece(m["content"].strip(), loss=answer),
                _Piece("<|eot_id|>", marker=True, loss=answer)]
    if add_generation_prompt:
        out += _llama3_header("assistant")
    return out


TEMPLATES: dict[str, Callable[[list[dict], bool], list[_Piece]]] = {
    "gemma": _gemma, "chatml": _chatml, "qwen2": _qwen2, "llama3": _llama3,
}
_END_OF_TURN = {"gemma": "<end_of_turn>", "chatml": "<|im_end|>", "qwen2": "<|im_end|>",
                "llama3": "<|eot_id|>"}


# The same formats as Jinja chat templates, written into exported tokenizers so that
# ``apply_chat_template`` in transformers renders exactly what :func:`render` does.
_JINJA_TURNS = {
    "gemma": ("{{ '<bos>' }}{%- set sys = '' -%}{%- set msgs = messages -%}"
              "{%- if messages[0]['role'] == 'system' -%}"
              "{%- set sys = messages[0]['content'] + '\\n\\n' -%}{%- set msgs = messages[1:] -%}"
              "{%- endif -%}{%- for m in msgs -%}"
              "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role'])"
              " + '\\n' + (sys if loop.first else '') + m['content'] | trim + '<end_of_turn>\\n' }}"
              "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}"
              "{%- endif -%}"),
    "chatml": ("{%- for m in messages -%}"
               "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
               "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
               "{%- endif -%}"),
    "llama3": ("{{ '<|begin_of_text|>' }}{%- for m in messages -%}"
               "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
               " + m['content'] | trim + '<|eot_id|>' }}{%- endfor -%}"
               "{%- if add_generation_prompt -%}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"),
}


def jinja_template(template: str) -> str:
    """``template`` as a Jinja chat template for Hugging Face tokenizers (same text as
    :func:`render`)."""
    _template_fn(template)
    if template == "qwen2":
        default = QWEN2_DEFAULT_SYSTEM.replace("'", "\\'")
        return ("{%- if messages[0]['role'] != 'system' -%}{{ '<|im_start|>system\\n"
                + default + "<|im_end|>\\n' }}{%- endif -%}" + _JINJA_TURNS["chatml"])
    return _JINJA_TURNS[template]


def end_of_turn_token(template: str) -> str:
    """The marker that closes an assistant turn (the token to stop generation at)."""
    _template_fn(template)
    return _END_OF_TURN[template]


def _template_fn(template: str) -> Callable[[list[dict], bool], list[_Piece]]:
    try:
        return TEMPLATES[template]
    except KeyError:
        raise ValueError(f"unknown chat template {template!r}; "
                         f"known: {sorted(TEMPLATES)}") from None


def _check_messages(messages: Any, where: str | None) -> list[dict]:
    """Validates the structure and role order; returns the messages as a list of dicts."""
    def bad(msg):
        return DataError(msg, where=where, reason="messages")

    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise bad(f"messages must be a list of {{'role', 'content'}} dicts, "
                  f"got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise bad(f"message {i} must be a dict with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise bad(f"message {i} has role {m['role']!r}; expected one of {list(ROLES)}")
        if not isinstance(m["content"], str):
            raise bad(f"message {i} ({m['role']}) content must be a string, "
                      f"got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    turns = out[1:] if out and out[0]["role"] == "system" else out
    if not turns:
        raise bad("the conversation has no user message")
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            idx = i + len(out) - len(turns)
            raise bad(f"message {idx} has role {m['role']!r} but {expected!r} was expected: after "
                      f"an optional system message, user and assistant turns must alternate, "
                      f"starting with user")
    return out


def render(messages: Sequence[Mapping[str, str]], template: str, *,
           add_generation_prompt: bool = False) -> str:
    """The conversation as text in ``template``'s format (``<image>`` placeholders kept).

    Equals what the model family's Hugging Face chat template produces with
    ``apply_chat_template(messages, tokenize=False, add_generation_prompt=...)``.
    """
    fn = _template_fn(template)
    return "".join(p.text for p in fn(_check_messages(messages, None), add_generation_prompt))


def assistant_prompt(messages: Sequence[Mapping[str, str]], template: str) -> str:
    """The text prompt for generating the conversation's final answer.

    A trailing assistant message (the reference answer of a training conversation) is dropped;
    the text then ends with the opening of an assistant turn.
    """
    return render(_without_final_answer(messages), template, add_generation_prompt=True)


def encode_prompt(tokenizer, messages: Sequence[Mapping[str, str]], template: str,
                  **kwargs) -> Encoded:
    """:func:`encode` of the prompt for generating the final answer (see
    :func:`assistant_prompt`): a trailing assistant message is dropped and the ids end with the
    opening of an assistant turn; ``loss_mask`` is all zeros, and with ``prefix_lm`` the
    ``mask_ar`` prefix ends where the first assistant turn opens (for a single-turn prompt, the
    whole prompt)."""
    kwargs["add_generation_prompt"] = True
    return encode(tokenizer, _without_final_answer(messages), template, **kwargs)


def _without_final_answer(messages):
    messages = list(messages)
    if messages and isinstance(messages[-1], Mapping) and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    return messages


def _single_token_id(tokenizer, token: str, what: str) -> int:
    """The id of ``token``, which must be one token of the tokenizer's vocabulary."""
    idx = tokenizer.convert_tokens_to_ids(token)
    if idx is None or tokenizer.convert_ids_to_tokens(int(idx)) != token:
        raise ValueError(f"{what} {token!r} is not a token of the tokenizer "
                         f"({type(tokenizer).__name__}, {len(tokenizer)} tokens); it must be a "
                         f"single (special) token")
    return int(idx)


def encode(
    tokenizer,
    messages: Sequence[Mapping[str, str]],
    template: str,
    *,
    num_image_tokens: int | Sequence[int],
    num_images: int,
    image_token: str = IMAGE_PLACEHOLDER,
    max_length: int | None = None,
    truncation: str = "error",
    prefix_lm: bool = False,
    add_generation_prompt: bool = False,
    where: str = "",
) -> Encoded:
    """Tokenises a conversation in ``template``'s format into model inputs.

    Args:
      tokenizer: a Hugging Face tokenizer holding the template's markers and ``image_token``
        as single tokens (a missing one is a ``ValueError`` naming it).
      messages: the conversation (see the module docstring). For training
        (``add_generation_prompt=False``) it must end with an assistant message; for inference
        (``add_generation_prompt=True``) with a user message.
      template: ``gemma`` | ``chatml`` | ``qwen2`` | ``llama3``.
      num_image_tokens: tokens per image: one count for all images, or one per image.
      num_images: the images that come with the conversation. The prompt must hold exactly as
        many ``<image>`` placeholders; the i-th placeholder becomes ``num_image_tokens[i]``
        copies of ``image_token``. Placeholders are never inserted automatically.
      image_token: the token images expand to (e.g. ``<image>``, ``<image_soft_token>``).
      max_length: the most tokens allowed (``None``: no limit).
      truncation: what to do with a longer conversation. ``"error"``: raise.
        ``"right"``: cut tokens from the right, only after the prompt of the first answer:
        the tokens up to and including the first assistant turn's opening, and every image
        token, are always kept, and at least one answer token must survive — otherwise it is
        an error all the same. The cut answer then has no end-of-turn marker.
      prefix_lm: ``mask_ar`` is 0 up to and including the opening of the first assistant turn
        (with ``add_generation_prompt``, the whole prompt) and 1 after; otherwise all 1.
      add_generation_prompt: end with the opening of an assistant turn (inference); the
        ``loss_mask`` is then all 0 and a too-long prompt is always an error.
      where: the record id, named in errors.

    Raises:
      DataError: with ``reason`` ``"messages"`` (bad structure or role order),
        ``"image_placeholders"`` (placeholder count differs from ``num_images``, or a
        placeholder in an answer), ``"empty_answer"`` (an assistant message empty or only
        whitespace) or ``"too_long"``.
    """
    where_ = where or None
    fn = _template_fn(template)
    if truncation not in ("error", "right"):
        raise ValueError(f"truncation must be 'error' or 'right', got {truncation!r}")
    if isinstance(num_image_tokens, (int, np.integer)):
        per_image = [int(num_image_tokens)] * num_images
    else:
        per_image = [int(n) for n in num_image_tokens]
        if len(per_image) != num_images:
            raise ValueError(f"num_image_tokens has {len(per_image)} entries for "
                             f"{num_images} images")
    if any(n < 1 for n in per_image):
        raise ValueError(f"num_image_tokens must be positive, got {num_image_tokens}")

    msgs = _check_messages(messages, where_)
    last = msgs[-1]["role"]
    if add_generation_prompt and last != "user":
        raise DataError("a generation prompt needs a conversation ending with a user message, "
                        f"this one ends with {last!r}", where=where_, reason="messages")
    if not add_generation_prompt and last != "assistant":
        raise DataError("a training conversation must end with an assistant message, this one "
                        f"ends with {last!r}", where=where_, reason="messages")
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            if not m["content"].strip():
                raise DataError(f"message {i} is an empty assistant answer", where=where_,
                                reason="empty_answer")
            if IMAGE_PLACEHOLDER in m["content"]:
                raise DataError(f"message {i} (assistant) contains the image placeholder "
                                f"{IMAGE_PLACEHOLDER!r}; images belong in the prompt",
                                where=where_, reason="image_placeholders")
    found = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in msgs if m["role"] != "assistant")
    if found != num_images:
        raise DataError(f"found {found} {IMAGE_PLACEHOLDER!r} placeholders in the prompt but "
                        f"{num_images} images were given; each image needs exactly one "
                        f"placeholder", where=where_, reason="image_placeholders")

    # Merge runs of text with the same loss flag, then split prompt text at the placeholders:
    # `chunks` is a list of (kind, value, loss), kind "text" | "marker" | "image".
    chunks: list[tuple[str, Any, bool]] = []
    for p in fn(msgs, add_generation_prompt):
        if p.marker:
            chunks.append(("marker", p.text, p.loss))
        elif chunks and chunks[-1][0] == "text" and chunks[-1][2] == p.loss:
            chunks[-1] = ("text", chunks[-1][1] + p.text, p.loss)
        elif p.text:
            chunks.append(("text", p.text, p.loss))
    split: list[tuple[str, Any, bool]] = []
    for kind, value, loss in chunks:
        if kind == "text" and not loss:
            parts = value.split(IMAGE_PLACEHOLDER)
            for j, part in enumerate(parts):
                if j:
                    split.append(("image", None, False))
                if part:
                    split.append(("text", part, False))
        else:
            split.append((kind, value, loss))

    texts = [value for kind, value, _ in split if kind == "text"]
    text_ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    image_id = _single_token_id(tokenizer, image_token, "the image token") if num_images else -1
    ids: list[int] = []
    loss_mask: list[int] = []
    image_idx = image_end = 0  # image_end: one past the last image token.
    for kind, value, loss in split:
        if kind == "marker":
            new = [_single_token_id(tokenizer, value, f"template {template!r} marker")]
        elif kind == "image":
            new = [image_id] * per_image[image_idx]
            image_idx += 1
            image_end = len(ids) + len(new)
        else:
            new = list(next(text_ids))
        ids += new
        loss_mask += [int(loss)] * len(new)

    n = len(ids)
    tokens = np.asarray(ids, np.int32)
    loss_arr = np.asarray(loss_mask, np.int32)
    answer = np.flatnonzero(loss_arr)
    # The prefix ends with the first assistant turn's opening: its first answer token.
    prefix_end = int(answer[0]) if answer.size else n
    if max_length is not None and n > max_length:
        if truncation == "error":
            raise DataError(f"{n} tokens, more than max_length={max_length}", where=where_,
                            reason="too_long")
        if add_generation_prompt:
            raise DataError(f"the prompt has {n} tokens, more than max_length={max_length}; "
                            f"a generation prompt is never truncated", where=where_,
                            reason="too_long")
        if prefix_end >= n or max(prefix_end + 1, image_end) > max_length:
            raise DataError(f"{n} tokens, more than max_length={max_length}, and right "
                            f"truncation cannot fix it: the prompt ({prefix_end} tokens) and "
                            f"all image tokens (up to position {image_end}) must be kept, plus at "
                            f"least one answer token", where=where_, reason="too_long")
        tokens, loss_arr, n = tokens[:max_length], loss_arr[:max_length], max_length
    mask_ar = np.ones(n, np.int32)
    if prefix_lm:
        mask_ar[:prefix_end] = 0
    if add_generation_prompt:
        loss_arr = np.zeros(n, np.int32)  # A prompt is never trained on, history included.
    return Encoded(tokens=tokens, mask_ar=mask_ar, loss_mask=loss_arr, num_images=num_images)
