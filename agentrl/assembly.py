"""Token assembly: the ids of everything in a trajectory that the policy did not sample.

Each piece is the chat template's own text, tokenised: the prompt, the glue that closes an
assistant message (``<|im_end|>\\n``), the wrappers around tool output (``<information>…
</information>``, or a ``tool`` message and the next assistant header rendered by the template).
Tool output itself is encoded as plain text (``split_special_tokens``), so a document or a
program's output that contains ``<|im_end|>`` or ``<|im_start|>`` can never become a control token,
while the wrappers' own special tokens stay special.

An observation is fitted to the tokens the trajectory has left: the tool output is cut (with a
marker saying how much), never the wrappers, so the closing tag and the template's end survive. If
not even the wrappers fit, :meth:`TokenAssembler.observation` says so and the trajectory ends.

With a vision-language model's processor, images (the prompt's, and those a tool returns) are
``{"type": "image"}`` items of their message, so the chat template writes the processor's
placeholder where the model expects it; each placeholder is then replaced by the block of ids the
processor expands it to for that image (:func:`agentrl.multimodal.process_image`), a piece of its
own (mask 0) that carries the image and its processed tensors. Image blocks are never cut.

Everything here is synchronous and called from one thread of its own (see ``RolloutWorker``): the
event loop never renders templates or tokenises.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

from agentrl.trajectory import SpanRole

SENTINEL = "\ue000{}\ue001"  # private-use characters: never in a template, never in tool output
SENTINEL_PATTERN = re.compile("\ue000(\\d+)\ue001")


_PLAIN: dict[int, tuple[Any, Any]] = {}
_PLAIN_LOCK = threading.Lock()


def plain_tokenizer(tokenizer: Any) -> Any:
    """A private copy of a fast tokenizer's backend that always encodes special-token strings as
    text (``None`` for a slow tokenizer). Private, because switching the splitting on and off per
    call changes the Rust tokenizer's state while the engine's thread may be decoding with it;
    cached per tokenizer, because copying one takes a good fraction of a second."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    with _PLAIN_LOCK:
        if id(tokenizer) not in _PLAIN:
            from tokenizers import Tokenizer

            plain = Tokenizer.from_str(backend.to_str())
            plain.encode_special_tokens = True
            _PLAIN[id(tokenizer)] = (tokenizer, plain)  # the tokenizer is held so that its id stays its own
        return _PLAIN[id(tokenizer)][1]


@dataclass
class Piece:
    """Ids to append with loss mask 0. ``content`` pieces hold tool output (plain-text encoded)."""

    ids: list[int]
    role: SpanRole = "observation"
    content: bool = False
    image: Any = None  # an image block's image (RGB) and its processed tensors
    tensors: dict[str, Any] | None = None


class TokenAssembler:
    """Renders and tokenises a worker's prompts and observations for one tokenizer and env."""

    def __init__(self, tokenizer: Any, env: Any, processor: Any = None) -> None:
        self.tokenizer = tokenizer
        self.env = env
        self.processor = processor  # a vision-language model's: images become blocks of image tokens
        self._assistant_end: str | None = None

    # -- encoding ----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Template text: special-token strings become their special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_plain(self, text: str) -> list[int]:
        """Tool output: special-token strings are ordinary text."""
        plain = plain_tokenizer(self.tokenizer)
        if plain is None:
            return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
        return list(plain.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int], keep: tuple[str, ...] = ()) -> str:
        """Model text for the parser: special tokens dropped, except those in ``keep`` (action tags
        such as ``<tool_call>``, which some tokenizers register as special tokens)."""
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        for token in getattr(self.tokenizer, "all_special_tokens", ()):
            if token and token not in keep:
                text = text.replace(token, "")
        return text

    def decode_spans(self, ids: list[int], spans: list[Any]) -> list[str]:
        return [self.tokenizer.decode(ids[s.start:s.end]) for s in spans]

    def render(self, messages: list[dict[str, Any]], **options: Any) -> str:
        """The chat template's text. A vision-language model's messages are rendered as content
        lists (``[{"type": "text", "text": ...}, {"type": "image"}]``), the form its template reads."""
        if self.processor is not None:
            messages = [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str)
                        else m for m in messages]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, **options)

    def render_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        if self.processor is not None:
            return self.encode(self.render(messages, tools=tools, add_generation_prompt=True))
        return list(self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False
        ))

    def render_prompt_with_images(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                                  images: list[Any]) -> tuple[list[int], list[Piece]]:
        """The prompt's ids with ``images`` as ``{"type": "image"}`` items ahead of the first user
        message's text (unless the messages already hold that many image items), and the image
        pieces in the order their blocks appear."""
        from agentrl.multimodal import as_rgb

        messages = [dict(m) for m in messages]
        if sum(_image_items(m) for m in messages) != len(images):
            user = next((m for m in messages if m["role"] == "user"), messages[-1])
            text = user["content"] if isinstance(user["content"], str) else None
            if text is None:
                raise ValueError(f"the prompt holds {sum(_image_items(m) for m in messages)} image items for "
                                 f"{len(images)} images")
            user["content"] = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        rendered = self.render(messages, tools=tools, add_generation_prompt=True)
        queue = [as_rgb(i) for i in images]
        pieces = self._with_images(rendered, "observation", queue)
        if queue:
            raise ValueError(f"the chat template wrote no placeholder for {len(queue)} of the prompt's images")
        return [i for p in pieces for i in p.ids], [p for p in pieces if p.image is not None]

    def _with_images(self, text: str, role: SpanRole, images: list[Any]) -> list[Piece]:
        """Template text as pieces: its text encoded, each placeholder replaced by the next image's
        block (consumed from ``images``)."""
        from agentrl.multimodal import placeholder, process_image

        if self.processor is None or placeholder(self.processor) not in text:
            return [Piece(self.encode(text), role)]
        parts = text.split(placeholder(self.processor))
        if len(parts) - 1 > len(images):
            raise ValueError(f"the template wrote {len(parts) - 1} image placeholders for {len(images)} images")
        pieces = [Piece(self.encode(parts[0]), role)]
        for part in parts[1:]:
            image = images.pop(0)
            ids, tensors = process_image(self.processor, image)
            pieces += [Piece(ids, role, image=image, tensors=tensors), Piece(self.encode(part), role)]
        return [p for p in pieces if p.ids]

    # -- chat-template pieces ----------------------------------------------------------------

    def render_suffix(self, messages: list[dict[str, str]]) -> str:
        """The template's text for ``messages`` plus the next assistant prompt, as it would follow
        an earlier conversation (rendered after a fixed system message, which is then cut off)."""
        base = [{"role": "system", "content": "x"}]
        head = self.render(base)
        full = self.render(base + messages, add_generation_prompt=True)
        if not full.startswith(head):
            raise ValueError("the chat template does not render conversations incrementally")
        return full[len(head):]

    def assistant_end(self) -> str:
        """What the template writes after an assistant message's content (e.g. ``<|im_end|>\\n``)."""
        if self._assistant_end is None:
            base = [{"role": "system", "content": "x"}, {"role": "assistant", "content": "MARKER"}]
            rendered = self.render(base)
            self._assistant_end = rendered[rendered.rindex("MARKER") + len("MARKER"):]
        return self._assistant_end

    def end_glue(self, finish_reason: str, last_id: int | None) -> str:
        """The glue that closes an assistant turn. After a stop string it is the whole assistant end;
        after an EOS token it is what the template writes past that token (``\\n`` after a sampled
        ``<|im_end|>``), or the whole end when the EOS is another token (``<|endoftext|>``)."""
        end = self.assistant_end()
        if finish_reason != "eos" or last_id is None:
            return end
        eos_text = self.tokenizer.decode([last_id], skip_special_tokens=False)
        return end[len(eos_text):] if eos_text and end.startswith(eos_text) else end

    # -- observations ------------------------------------------------------------------------

    def observation(self, texts: list[str], finish_reason: str, last_id: int | None, final: bool,
                    budget: int | None, images: list[list[Any]] | None = None) -> list[Piece] | None:
        """The pieces that follow an assistant turn whose tool calls produced ``texts`` (and, with
        a processor, ``images[i]`` for ``texts[i]``), within ``budget`` tokens (``None``: no limit).
        ``None`` when not even the wrappers (and image blocks) fit."""
        from agentrl.multimodal import as_rgb

        counts = [len(i) for i in images or []] if self.processor is not None else []
        counts += [0] * (len(texts) - len(counts))
        queue = [as_rgb(image) for group in (images or []) for image in group] if self.processor is not None else []
        segments = self._xml_segments(texts, final, counts) if self.env.action_format == "xml" else \
            self._json_segments(texts, finish_reason, last_id, final, counts)
        pieces = []
        for kind, text in segments:
            if kind == "content":
                pieces.append(Piece(self.encode_plain(text), "observation", True))
            else:
                pieces += self._with_images(text, "template" if kind == "glue" else "observation", queue)
        if queue:
            raise ValueError(f"the chat template wrote no placeholder for {len(queue)} of the observation's images")
        if budget is None:
            return [p for p in pieces if p.ids]
        room = budget - sum(len(p.ids) for p in pieces if not p.content)
        if room < 0:
            return None
        for piece in pieces:
            if piece.content:
                piece.ids = self._fit(piece.ids, room)
                room -= len(piece.ids)
        return [p for p in pieces if p.ids]

    def _fit(self, ids: list[int], room: int) -> list[int]:
        if len(ids) <= room:
            return ids
        marker = self.encode_plain(f"\n[... {len(ids) - room} tokens truncated ...]\n")
        if room <= len(marker):
            return ids[:room]
        return ids[: room - len(marker)] + marker

    def _xml_segments(self, texts: list[str], final: bool, images: list[int]) -> list[tuple[str, str]]:
        """``observation_template``'s text before and after ``{observation}`` are the wrappers;
        the image blocks follow the text."""
        rendered = self.env.observation_template.format(observation=SENTINEL.format(0))
        head, tail = rendered.split(SENTINEL.format(0))
        if final:
            tail += self.env.final_turn_message
        marks = self._placeholder() * sum(images)
        return [("wrap", head), ("content", "\n".join(texts)), ("wrap", marks + tail)]

    def _placeholder(self) -> str:
        from agentrl.multimodal import placeholder

        return placeholder(self.processor) if self.processor is not None else ""

    def _json_segments(self, texts: list[str], finish_reason: str, last_id: int | None,
                       final: bool, images: list[int]) -> list[tuple[str, str]]:
        """The assistant end glue, then the tool messages and the next assistant header rendered
        by the template, with each tool message's content marked so it can be encoded apart. A
        message with images holds them as ``{"type": "image"}`` items after its text."""
        segments: list[tuple[str, str]] = [("glue", self.end_glue(finish_reason, last_id))]
        extra = [{"role": "user", "content": self.env.final_turn_message}] if final else []

        def messages(contents: list[str]) -> list[dict[str, Any]]:
            return [{"role": "tool", "content": [{"type": "text", "text": c}] + [{"type": "image"}] * n if n else c}
                    for c, n in zip(contents, images)] + extra

        marked = self.render_suffix(messages([SENTINEL.format(i) for i in range(len(texts))]))
        real = self.render_suffix(messages(texts))
        parts = SENTINEL_PATTERN.split(marked)  # wrapper, index, wrapper, index, ..., wrapper
        for contents in (texts, [t.strip() for t in texts]):  # some templates trim the content
            rebuilt = "".join(contents[int(p)] if i % 2 else p for i, p in enumerate(parts))
            if rebuilt == real:
                for i, part in enumerate(parts):
                    segments.append(("content", contents[int(part)]) if i % 2 else ("wrap", part))
                return segments
        raise ValueError("the chat template changes tool message content in a way that cannot be located "
                         "in its rendering; use a template that inserts message['content'] as it is")


def _image_items(message: dict[str, Any]) -> int:
    content = message.get("content")
    return 0 if isinstance(content, str) else sum(1 for item in content or [] if item.get("type") == "image")
