"""QA metrics (F1, EM, ROUGE-L, SacreBLEU) exactly as DESIGN.md §8 items 1-6 define them.

The published RealHiTBench numbers were made with this normalisation and these library calls, so every
detail matters to the hundredth: the decimal rounding happens *before* punctuation is removed (so
"2.25" becomes "2.2" and then "22"), ``round`` is Python's (round-half-even on the binary float), and
the text substituted back is ``str()`` of the rounded float ("10.0", not "10"). Only the prediction
gets the ``#`` placeholder when it normalises to nothing. rouge-score and sacrebleu are imported on
first use so that importing the scoring package stays cheap.
"""
from __future__ import annotations

import re
import string
import threading
from collections import Counter
from typing import Any

__all__ = ["normalize_answer", "round_decimals", "word_f1", "score_answer", "QA_METRICS"]

QA_METRICS = ("F1", "EM", "ROUGE-L", "SacreBLEU")

_DECIMAL = re.compile(r"\b\d+\.\d+\b")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# str.translate with a deletion table is the same as "".join(ch for ch in s if ch not in punctuation).
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
BLANK = "#"

_rouge_lock = threading.Lock()
_rouge_scorer: Any = None


def round_decimals(text: str) -> str:
    """Step 1: replace each ``\\b\\d+\\.\\d+\\b`` match by ``str(round(float(m), 1))``.

    There is no sign in the pattern, so "-2.25" keeps its "-" and becomes "-2.2"; digits glued to
    letters ("abc1.25") have no word boundary and are left alone.
    """
    return _DECIMAL.sub(lambda m: str(round(float(m.group()), 1)), text)


def normalize_answer(text: str) -> str:
    """Steps 1-5 of DESIGN.md §8.1, in order: round decimals, lowercase, drop punctuation,
    blank out the whole words a/an/the, collapse whitespace. (No ``#`` here: see ``score_answer``.)"""
    text = round_decimals(text)
    text = text.lower()
    text = text.translate(_PUNCT_TABLE)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def word_f1(reference: str, prediction: str) -> float:
    """Word-level F1 on already normalised strings: multiset overlap of whitespace tokens (0..1)."""
    ref_tokens, pred_tokens = reference.split(), prediction.split()
    overlap = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def _rouge_l(reference: str, prediction: str) -> float:
    global _rouge_scorer
    if _rouge_scorer is None:
        with _rouge_lock:
            if _rouge_scorer is None:
                from rouge_score import rouge_scorer

                _rouge_scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    # RougeScorer.score(target, prediction); the scorer holds no per-call state, so sharing is safe.
    return _rouge_scorer.score(reference, prediction)["rougeL"].fmeasure


def _sacrebleu(reference: str, prediction: str) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu([prediction], [[reference]]).score


def score_answer(reference: str, prediction: str) -> dict[str, float]:
    """Score one QA answer: ``{"F1", "EM", "ROUGE-L", "SacreBLEU"}`` as reported in the paper.

    F1, EM and ROUGE-L are ×100 and rounded to 2 decimals; SacreBLEU is already on a 0-100 scale
    and is rounded to 2 decimals. ``None`` counts as an empty string.
    """
    ref = normalize_answer("" if reference is None else str(reference))
    pred = normalize_answer("" if prediction is None else str(prediction))
    if not pred:
        pred = BLANK
    return {
        "F1": round(float(word_f1(ref, pred)) * 100, 2),
        "EM": 100.0 if ref == pred else 0.0,
        "ROUGE-L": round(float(_rouge_l(ref, pred)) * 100, 2),
        "SacreBLEU": round(float(_sacrebleu(ref, pred)), 2),
    }
