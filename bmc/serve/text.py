"""Text in, text out for serving: prompts become token ids and generated ids become text,
with the tokenizer a build carries (tokenizer.json, the `tokenizers` library) or as UTF-8
bytes for byte-level models. Imports neither torch nor transformers: serving stays small."""
from __future__ import annotations

import json
import os

from bmc.errors import ModelLoadError
from bmc.extras import require
from bmc.checksums import sha256

PARTIAL = "\ufffd"  # what decoding gives for a character whose bytes have not all come yet


class Text:
    """How prompt text becomes token ids and generated ids become text: a tokenizer's, or
    UTF-8 bytes (tokenizer None)."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids if self.tokenizer else list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`. An id the tokenizer does not know (a model's vocabulary is often
        padded past its tokenizer's) shows as `<id N>`: the library's decode drops it without
        a word, so text would go missing where the model produced a token."""
        if not self.tokenizer:
            return bytes(ids).decode("utf-8", "replace")
        known = self.tokenizer.get_vocab_size(with_added_tokens=True)
        pieces, run = [], []
        for token in ids:
            if 0 <= token < known:
                run.append(token)
                continue
            pieces += [self.tokenizer.decode(run, skip_special_tokens=True), f"<id {token}>"]
            run = []
        pieces.append(self.tokenizer.decode(run, skip_special_tokens=True))
        return "".join(pieces)


class Stream:
    """One prompt's generated text, handed out as it becomes printable. A token can end inside
    a character (byte-level BPE splits UTF-8), and a tokenizer's spacing depends on the tokens
    before it (SentencePiece-style decoders drop the space that starts a text), so the prompt
    and the continuation are decoded together and only what is new is returned, once it no
    longer ends in a partial character."""

    def __init__(self, text: Text, prompt: list[int] = ()):
        self.text, self.prompt, self.ids, self.shown = text, list(prompt), [], 0
        self.prompt_text = text.decode(self.prompt)

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._new(final=False)

    def finish(self) -> str:
        return self._new(final=True)

    def continuation(self) -> str:
        """The generated text as it reads after the prompt."""
        whole = self.text.decode(self.prompt + self.ids)
        if whole.startswith(self.prompt_text):
            return whole[len(self.prompt_text):]
        return self.text.decode(self.ids)  # a decoder that rewrites the prompt's end: the tokens alone

    def _new(self, final: bool) -> str:
        decoded = self.continuation()
        if not final and decoded.endswith(PARTIAL):
            return ""
        new = decoded[self.shown:]
        self.shown = max(self.shown, len(decoded))
        return new


def load_tokenizer(directory: str, manifest: dict):
    """The tokenizer a build carries (None when it carries none), its checksum in the
    manifest checked before it is read."""
    name = manifest.get("tokenizer")
    if not name:
        return None
    tokenizers = require("tokenizers", "text prompts on a build with a tokenizer")
    path = os.path.join(directory, name)
    if not os.path.isfile(path) or sha256(path) != manifest.get("files", {}).get(name):
        raise ModelLoadError(f"{path} is missing or does not match its checksum in manifest.json; "
                             f"restore it or rebuild the directory")
    try:
        return tokenizers.Tokenizer.from_file(path)
    except Exception as exc:  # noqa: BLE001 - the library raises plain Exceptions for bad files
        raise ModelLoadError(f"cannot read {path} as a tokenizer: {' '.join(str(exc).split())[:160]}") from None


def default_eos(directory: str, tokenizer) -> int | None:
    """The end-of-text id tokenizer_config.json names (None where it names none)."""
    path = os.path.join(directory, "tokenizer_config.json")
    if tokenizer is None or not os.path.isfile(path):
        return None
    with open(path) as f:
        token = json.load(f).get("eos_token")
    token = token.get("content") if isinstance(token, dict) else token
    return tokenizer.token_to_id(token) if isinstance(token, str) else None
