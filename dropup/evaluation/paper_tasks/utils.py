"""Metrics of the paper's suite that lm-eval does not ship (loaded by lm-eval from eval.include_path).

Character F1 (the paper's metric for JEMHopQA, NIILC and JSQuAD): the harmonic mean of the precision and recall of
the prediction's characters against the reference's, as multisets, after stripping whitespace; the best over the
references; the corpus score is the mean over documents."""

from collections import Counter


def _char_f1(prediction: str, reference: str) -> float:
    pred, ref = Counter("".join(prediction.split())), Counter("".join(reference.split()))
    common = sum((pred & ref).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(pred.values()), common / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def char_f1(references, predictions) -> float:
    """One document: its prediction against each of its references, the best."""
    refs = references if isinstance(references, (list, tuple)) else [references]
    flat = [r for ref in refs for r in (ref if isinstance(ref, (list, tuple)) else [ref])]
    return max(_char_f1(predictions[0], ref) for ref in flat)
