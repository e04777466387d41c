"""A plain-language reading of the training curves: what happened and what to try next.

``read_curves(history)`` looks at the per-epoch lists a run writes (loss, accuracy,
val_loss, val_accuracy) and returns findings, most serious first:

- ``diverged``: a loss became NaN/inf, or the training loss climbed well above its best
  (the learning rate is too high);
- ``stuck``: the loss stays flat at ln(classes), the loss of a uniform guess (the network
  learns nothing: learning rate far off, or labels unrelated to the images);
- ``overfitting``: validation loss rising while training loss keeps falling;
- ``still_improving``: the curves were still going down at the last epoch (train longer);
- ``underfitting``: the curves levelled off while training accuracy is still low;
- ``healthy``: none of the above;
- ``no_validation`` / ``too_short``: notes on what could not be judged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import numpy as np

Kind = Literal["diverged", "stuck", "overfitting", "still_improving", "underfitting", "healthy",
               "no_validation", "too_short"]
Level = Literal["bad", "warn", "good", "info"]

# Thresholds, chosen on this project's runs and the usual textbook examples.
RISE_TOLERANCE = 0.05        # val loss this fraction above its minimum counts as rising
DIVERGE_RISE = 0.25          # train loss this fraction above its minimum counts as diverging
STUCK_TOLERANCE = 0.05       # within 5 % of ln(classes) counts as the uniform-guess loss
STUCK_MOVE = 0.03            # ... and moving less than 3 % from first to last epoch
STUCK_ACCURACY = 1.5         # ... with train accuracy at most 1.5x chance (1 / classes)
IMPROVING_PER_EPOCH = 0.01   # a loss still falling more than 1 % per epoch at the end
PLATEAU_ACCURACY = 0.8       # below this train accuracy a plateau means underfitting
UNDERFIT_GAP = 0.05          # ... when validation accuracy is this close to train accuracy


@dataclass(frozen=True)
class Finding:
    kind: Kind
    level: Level
    text: str

    def __str__(self) -> str:
        return self.text


def _series(history: Mapping[str, Sequence], key: str) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in history.get(key) or []], dtype=np.float64)


def _first_nonfinite(values: np.ndarray, present: np.ndarray) -> int | None:
    """Index of the first NaN/inf in an observed (not None) position."""
    bad = np.flatnonzero(present & ~np.isfinite(values))
    return int(bad[0]) if bad.size else None


def read_curves(history: Mapping[str, Sequence], num_classes: int | None = None) -> list[Finding]:
    """Findings about a run's curves, most serious first; never empty for a non-empty history."""
    loss = _series(history, "loss")
    n = len(loss)
    if n == 0:
        return [Finding("too_short", "info", "No epoch finished, so there are no curves to read.")]
    acc = _series(history, "accuracy")
    raw_val = history.get("val_loss") or []
    val_present = np.array([v is not None for v in raw_val] + [False] * (n - len(raw_val)))[:n]
    val_loss = _series(history, "val_loss")[:n]
    val_acc = _series(history, "val_accuracy")[:n]
    has_val = bool(val_present.any())

    # --- diverged: non-finite losses ---------------------------------------------------
    for name, values, present in (("training", loss, np.ones(n, bool)), ("validation", val_loss, val_present)):
        i = _first_nonfinite(values, present[:len(values)])
        if i is not None:
            return [Finding("diverged", "bad",
                            f"Diverged: the {name} loss became {values[i]} at epoch {i + 1}. The weights blew "
                            f"up, almost always because the learning rate is too high: try one ten times "
                            f"smaller (--lr), add warm-up (--warmup 1), or check the inputs for NaNs.")]
    # --- diverged: training loss climbing away from its best -----------------------------
    best = int(np.argmin(loss))
    if n >= 2 and best < n - 1 and loss[-1] > loss[best] * (1 + DIVERGE_RISE) and loss[-1] - loss[best] > 0.05:
        return [Finding("diverged", "bad",
                        f"Unstable: the training loss went back up from {loss[best]:.3f} at epoch {best + 1} "
                        f"to {loss[-1]:.3f} at epoch {n}. Training loss should only fall; when it climbs "
                        f"the learning rate is too high (try --lr ten times smaller, or a decaying "
                        f"--schedule cosine).")]
    # --- stuck at the uniform-guess loss -------------------------------------------------
    if num_classes and num_classes > 1 and n >= 3:      # two epochs of a small run can look flat
        chance = math.log(num_classes)
        near = abs(loss[-1] - chance) <= STUCK_TOLERANCE * chance
        flat = abs(loss[0] - loss[-1]) <= STUCK_MOVE * max(loss[0], 1e-12)
        guessing = not np.isfinite(acc[-1]) or acc[-1] <= STUCK_ACCURACY / num_classes
        if near and flat and guessing:
            return [Finding("stuck", "bad",
                            f"Not learning: the training loss stayed at {loss[-1]:.3f}, close to "
                            f"ln({num_classes}) = {chance:.3f}, the loss of guessing every class equally. "
                            f"The learning rate is probably wrong: too high kills the network in the first "
                            f"steps, too low never moves it (try --lr 1e-3 with adam, 0.05 with sgd). Also "
                            f"check that the labels match the images.")]

    findings: list[Finding] = []
    if n < 3:
        findings.append(Finding("too_short", "info",
                                f"Only {n} epoch{'s' if n > 1 else ''}: too few to see a trend. Train for "
                                f"more epochs to let the curves say something."))

    # --- overfitting ---------------------------------------------------------------------
    overfit = False
    if has_val and n >= 3 and np.isfinite(val_loss).sum() >= 3:
        vb = int(np.nanargmin(val_loss))
        vl_last = val_loss[-1]
        if (vb < n - 1 and np.isfinite(vl_last) and vl_last > val_loss[vb] * (1 + RISE_TOLERANCE)
                and loss[-1] < loss[vb]):
            overfit = True
            gap = ""
            if np.isfinite(acc[-1]) and np.isfinite(val_acc[-1]):
                gap = (f" Training accuracy is {acc[-1]:.1%} against {val_acc[-1]:.1%} on validation.")
            best_acc = ""
            if np.isfinite(val_acc).any():
                ba = int(np.nanargmax(val_acc))
                best_acc = f" Validation accuracy peaked at {val_acc[ba]:.1%} at epoch {ba + 1}."
            findings.append(Finding(
                "overfitting", "warn",
                f"Overfitting: validation loss rose from {val_loss[vb]:.3f} at epoch {vb + 1} to {vl_last:.3f} "
                f"at epoch {n} while training loss kept falling ({loss[vb]:.3f} to {loss[-1]:.3f}): the "
                f"network is memorising the training images instead of learning what generalises.{gap}"
                f"{best_acc} Try data augmentation (--flip random --translate 2 --cutout 8), weight "
                f"decay (--weight-decay 5e-4), label smoothing (--label-smoothing 0.1), or stop earlier "
                f"(--early-stop 3) and keep the best epoch's weights (--keep best)."))

    # --- still improving at the end ------------------------------------------------------
    improving = False
    if not overfit and n >= 2:
        curve, label = (val_loss, "validation loss") if has_val and np.isfinite(val_loss[-1]) else (loss, "training loss")
        k = max(1, min(3, n // 3))
        before, last = curve[-1 - k], curve[-1]
        if np.isfinite(before) and np.isfinite(last) and before > 0:
            per_epoch = (before - last) / before / k
            if per_epoch > IMPROVING_PER_EPOCH and last <= np.nanmin(curve) + 1e-12:
                improving = True
                findings.append(Finding(
                    "still_improving", "warn",
                    f"Still improving: the {label} fell from {before:.3f} to {last:.3f} over the last "
                    f"{k} epoch{'s' if k > 1 else ''} ({per_epoch:.1%} per epoch) and is at its lowest at the "
                    f"last epoch. The model has not finished learning: train longer "
                    f"(--epochs {max(2 * n, n + 5)}), or resume this run with more epochs."))

    # --- underfitting: levelled off while train accuracy is low ----------------------------
    if not overfit and not improving and n >= 3 and np.isfinite(acc[-1]) and acc[-1] < PLATEAU_ACCURACY:
        close = not has_val or not np.isfinite(val_acc[-1]) or acc[-1] - val_acc[-1] < UNDERFIT_GAP
        if close:
            findings.append(Finding(
                "underfitting", "warn",
                f"Underfitting: the curves levelled off with training accuracy only {acc[-1]:.1%}. The "
                f"model cannot fit even the training images. Try a larger model (--model), a higher "
                f"learning rate or one that decays (--schedule cosine), less regularisation (weight "
                f"decay, augmentation), or more epochs."))

    if not has_val:
        findings.append(Finding("no_validation", "info",
                                "No validation split, so overfitting cannot be seen: hold some training images "
                                "out with --val-split 0.1."))
    serious = {"overfitting", "still_improving", "underfitting"}
    if not any(f.kind in serious for f in findings) and n >= 3:
        text = "Healthy: the training loss fell steadily and levelled off"
        if has_val:
            vb = int(np.nanargmin(val_loss))
            text += (f", and validation loss followed it (lowest {val_loss[vb]:.3f} at epoch {vb + 1}) "
                     f"without turning back up")
            if np.isfinite(acc[-1]) and np.isfinite(val_acc[-1]):
                text += f"; final accuracy {acc[-1]:.1%} on training, {val_acc[-1]:.1%} on validation"
        findings.insert(0, Finding("healthy", "good", text + ". Nothing in the curves needs fixing."))
    order = {"bad": 0, "warn": 1, "good": 2, "info": 3}
    return sorted(findings, key=lambda f: order[f.level])
