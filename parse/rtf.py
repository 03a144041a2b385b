"""The plain text of an RTF document, best effort: what Outlook's rich-text bodies say.

Takes RTF bytes (a decompressed TNEF body, see :func:`parse.tnef.decompress_rtf`); gives the
text: paragraphs and line breaks as newlines, ``\\'hh`` escapes decoded in the document's code
page (``\\ansicpgN``, cp1252 when absent or unknown), ``\\uN`` characters, and nothing of the
font, colour and style tables, pictures, objects or other ignorable destinations.  Never
raises; formatting is dropped, not interpreted.
"""

from __future__ import annotations

import codecs
import re

_TOKEN = re.compile(rb"\\([a-zA-Z]{1,32})(-?\d{1,10})? ?|\\'([0-9a-fA-F]{2})|\\(.)|([{}])|"
                    rb"([^\\{}\r\n]+)|[\r\n]+", re.DOTALL)
_SKIPPED_DESTINATIONS = frozenset((
    b"fonttbl", b"colortbl", b"stylesheet", b"info", b"pict", b"object", b"header", b"footer",
    b"headerl", b"headerr", b"footerl", b"footerr", b"themedata", b"colorschememapping",
    b"datastore", b"latentstyles", b"listtable", b"listoverridetable", b"rsidtbl",
    b"generator", b"xmlnstbl", b"mmathPr", b"pgdsctbl", b"fldinst", b"filetbl",
    b"revtbl", b"userprops", b"nonshppict", b"shp",
))
_BREAKS = {b"par": "\n", b"line": "\n", b"tab": "\t", b"cell": "\t", b"row": "\n",
           b"emdash": "\u2014", b"endash": "\u2013", b"bullet": "\u2022", b"lquote": "\u2018",
           b"rquote": "\u2019", b"ldblquote": "\u201c", b"rdblquote": "\u201d"}


def rtf_to_text(data: bytes) -> str:
    codepage = "cp1252"
    out: list[str] = []
    pending = bytearray()  # \'hh bytes, decoded together (multi-byte code pages)
    skip_depth = 0          # > 0 while inside an ignored group
    depth = 0
    skip_chars = 0          # fallback characters after \uN
    unicode_skip = 1
    group_start = False

    def flush() -> None:
        if pending:
            out.append(pending.decode(codepage, "replace"))
            pending.clear()

    for word, number, hexbyte, symbol, brace, text in _TOKEN.findall(data):
        if brace == b"{":
            depth += 1
            group_start = True
            continue
        starting, group_start = group_start, False
        if brace == b"}":
            if skip_depth and depth <= skip_depth:
                skip_depth = 0
            depth -= 1
            continue
        if skip_depth:
            continue
        if symbol == b"*" and starting:
            skip_depth = depth
            continue
        if word:
            if word in _SKIPPED_DESTINATIONS:
                skip_depth = depth
            elif word == b"ansicpg" and number:
                candidate = f"cp{int(number)}"
                try:
                    codecs.lookup(candidate)
                    codepage = candidate
                except LookupError:
                    pass
            elif word == b"uc" and number:
                unicode_skip = max(0, int(number))
            elif word == b"u" and number:
                flush()
                out.append(chr(int(number) % 65536) if int(number) % 65536 < 0xD800 or
                           int(number) % 65536 > 0xDFFF else "\ufffd")
                skip_chars = unicode_skip
            elif word in _BREAKS:
                flush()
                out.append(_BREAKS[word])
            continue
        if hexbyte:
            if skip_chars:
                skip_chars -= 1
                continue
            pending.append(int(hexbyte, 16))
            continue
        flush()
        if symbol:
            if symbol in (b"\\", b"{", b"}"):
                out.append(symbol.decode())
            elif symbol == b"~":
                out.append("\u00a0")
            continue
        if text:
            if skip_chars:
                dropped = min(skip_chars, len(text))
                text = text[dropped:]
                skip_chars -= dropped
            out.append(text.decode(codepage, "replace"))
    flush()
    return "".join(out).replace("\x00", "").strip() + "\n"
