"""Radiology report cleaning as in MGCA, which UniMedI follows.

`clean_report` keeps the FINDINGS and IMPRESSION sections of a MIMIC-CXR style report
(section headers in capitals followed by a colon at the start of a line), normalises
whitespace, splits the text into sentences and drops the report when fewer than three
sentences remain (UniMedI, Sec. 4.1: "we discard any brief reports that contain fewer than
three sentences").
"""

from __future__ import annotations

import re
from typing import NamedTuple

# UniMedI Sec. 4.1: reports with fewer than three sentences are discarded.
MIN_SENTENCES = 3
# MGCA drops sentence fragments of one word token or less (e.g. "None.", "2.").
MIN_SENTENCE_WORDS = 2

# A section header: capitals (with spaces and / & , ( ) -) and a colon, at the start of a line.
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z /&,()-]*?)[ \t]*:", re.MULTILINE)
# Header spellings that mean findings or impression (after lower-casing), as in MIMIC-CXR's
# section parser: combined headers count as the impression.
_SECTION_NAMES = {
    "finding": "findings", "findings": "findings",
    "impression": "impression", "impressions": "impression", "conclusion": "impression",
    "conclusions": "impression", "findings and impression": "impression",
    "findings/impression": "impression", "impression and findings": "impression",
}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_LIST_MARKER = re.compile(r"^\(?\d+[.)]\s*")
_WORD = re.compile(r"\w+")


class CleanedReport(NamedTuple):
    """`text` is the cleaned report, or None when dropped; `reason` says why ("" if kept)."""

    text: str | None
    reason: str


def normalize_whitespace(text: str) -> str:
    """Collapses every run of whitespace (newlines included) into one space."""
    return " ".join(text.split())


def extract_sections(text: str) -> str | None:
    """FINDINGS then IMPRESSION text (the last section of each name), or None if neither."""
    headers = list(_HEADER.finditer(text))
    found = {}
    for header, following in zip(headers, headers[1:] + [None]):
        name = _SECTION_NAMES.get(normalize_whitespace(header.group(1)).lower())
        if name:
            found[name] = text[header.end():following.start() if following else len(text)]
    parts = [normalize_whitespace(found.get(name, "")) for name in ("findings", "impression")]
    joined = " ".join(p for p in parts if p)
    return joined if found else None


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` (split after . ! ? followed by whitespace), without list markers
    such as "1." and without fragments of fewer than MIN_SENTENCE_WORDS word tokens."""
    sentences = []
    for piece in _SENTENCE_END.split(normalize_whitespace(text)):
        piece = _LIST_MARKER.sub("", piece).strip()
        if len(_WORD.findall(piece)) >= MIN_SENTENCE_WORDS:
            sentences.append(piece)
    return sentences


def clean_report(text: str | None, *, sections: bool = True,
                 min_sentences: int = MIN_SENTENCES) -> CleanedReport:
    """Cleans one report; `sections=False` keeps the whole text (reports without headers)."""
    if text is None or not text.strip():
        return CleanedReport(None, "empty report")
    if sections:
        text = extract_sections(text)
        if text is None:
            return CleanedReport(None, "no FINDINGS or IMPRESSION section")
    sentences = split_sentences(text)
    if len(sentences) < min_sentences:
        return CleanedReport(None, f"{len(sentences)} sentence(s), fewer than {min_sentences}")
    return CleanedReport(" ".join(sentences), "")
