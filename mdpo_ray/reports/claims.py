"""The verdicts on the paper's claims, decided from a sweep's seed means by rules stated beside them
(and printed with them), so the results page says what the runs show, whatever that is. One frame row
per trial: the override columns below, `variant` ("minor_dpo β=0.1", "sft"), accuracies in points
(`acc_points`, the SFT reference's `reference_points`) and the held-out Δw / Δl."""

from __future__ import annotations

import math

import pandas as pd

ACC = "eval/answer_accuracy"
DW, DL = "eval/delta_chosen/mean", "eval/delta_rejected/mean"
LR, LOSS, BETA, KIND, SEED = "optim.lr", "loss.name", "loss.beta", "builtin.rejected_kind", "seed"
DEGRADED_POINTS = 5.0  # DPO "degrades" at an lr where its mean accuracy is this far below the SFT reference
HOLDS_POINTS = 2.0  # MinorDPO "holds" there if its mean accuracy is no more than this below the reference


def kinds(frame: pd.DataFrame) -> list:
    return sorted(frame[KIND].dropna().unique(), key=str) or [math.nan]


def _means(frame: pd.DataFrame, column: str) -> pd.Series:
    """Mean over seeds, indexed by (kind, variant, lr)."""
    return frame.groupby([KIND, "variant", LR], dropna=False)[column].mean()


def claims(frame: pd.DataFrame) -> list[str]:
    """Each of the paper's claims, a rule that decides it from the seed means, and what the rule found."""
    acc, dw, dl = _means(frame, "acc_points"), _means(frame, DW), _means(frame, DL)
    reference = frame.groupby(KIND, dropna=False)["reference_points"].mean()
    pairs = [(kind, beta) for kind in kinds(frame)
             for beta in sorted(frame[frame[LOSS] == "minor_dpo"][BETA].dropna().unique())]
    lrs = sorted(frame[LR].unique())
    lines = ["## What the runs say about the paper's claims", "",
             ("Each verdict is computed from the seed means in the tables below by the rule stated with it; "
              "MinorDPO and DPO are compared at the same rejected kind, β and learning rate."), ""]

    cells = [(kind, beta, lr) for kind, beta in pairs for lr in lrs
             if (kind, f"minor_dpo β={beta:g}", lr) in acc.index and (kind, f"dpo β={beta:g}", lr) in acc.index]
    if not cells:
        return lines + ["No finished MinorDPO and DPO trials at matching settings: nothing to compare yet.", ""]

    def at(series, kind, loss, beta, lr):
        return series[(kind, f"{loss} β={beta:g}", lr)]

    # 1. The rejected answer is not driven far below the reference.
    shallower = [abs(at(dl, *c[:1], "minor_dpo", *c[1:])) < abs(at(dl, *c[:1], "dpo", *c[1:])) for c in cells]
    top = [(at(dl, k, "minor_dpo", b, lrs[-1]), at(dl, k, "dpo", b, lrs[-1])) for k, b in pairs
           if (k, f"minor_dpo β={b:g}", lrs[-1]) in dl.index and (k, f"dpo β={b:g}", lrs[-1]) in dl.index]
    lines += [f"1. **The rejected answer is not driven far below the reference** — "
              f"{_verdict(sum(shallower), len(shallower))}. Rule: MinorDPO's mean Δl is closer to 0 than DPO's. "
              f"It is in {sum(shallower)} of {len(shallower)} settings; at the highest learning rate "
              f"({lrs[-1]:g}) Δl is " + ", ".join(f"{m:+.1f} (MinorDPO) vs {d:+.1f} (DPO)" for m, d in top) + "."]
    # 2. The chosen answer's likelihood is not dragged down with it.
    kept = [at(dw, c[0], "minor_dpo", c[1], c[2]) >= 0 for c in cells]
    dpo_down = [at(dw, c[0], "dpo", c[1], c[2]) < 0 for c in cells]
    higher = [at(dw, c[0], "minor_dpo", c[1], c[2]) > at(dw, c[0], "dpo", c[1], c[2]) for c in cells]
    lines += [(f"2. **The chosen answer's likelihood is not dragged down** — {_verdict(sum(kept), len(kept))}. "
               f"Rule: MinorDPO's mean Δw ≥ 0. It is in {sum(kept)} of {len(kept)} settings (DPO's Δw < 0 in "
               f"{sum(dpo_down)} of {len(dpo_down)}; MinorDPO's Δw above DPO's in {sum(higher)}).")]
    # 3. Performance holds at learning rates where DPO degrades.
    degraded = [c for c in cells if at(acc, c[0], "dpo", c[1], c[2]) < reference[c[0]] - DEGRADED_POINTS]
    holds = [c for c in degraded if at(acc, c[0], "minor_dpo", c[1], c[2]) >= reference[c[0]] - HOLDS_POINTS]
    detail = "; ".join(f"{c[0]} β={c[1]:g} lr={c[2]:g}: {at(acc, c[0], 'minor_dpo', c[1], c[2]):.1f} vs DPO "
                       f"{at(acc, c[0], 'dpo', c[1], c[2]):.1f} (reference {reference[c[0]]:.1f})" for c in degraded)
    lines += ["3. **Accuracy holds where DPO degrades** — "
              + (f"{_verdict(len(holds), len(degraded))}. " if degraded else "not tested: DPO never degraded. ")
              + f"Rule: where DPO's mean accuracy is more than {DEGRADED_POINTS:g} points below the SFT reference, "
              f"MinorDPO's is at most {HOLDS_POINTS:g} below it. DPO degraded in {len(degraded)} of {len(cells)} "
              f"settings and MinorDPO held in {len(holds)} of those" + (f" ({detail})." if degraded else ".")]
    # 4. Up to +5 accuracy points over DPO (each at its best learning rate).
    gains = []
    for kind, beta in pairs:
        best = {loss: max((at(acc, kind, loss, beta, lr) for lr in lrs if (kind, f"{loss} β={beta:g}", lr)
                           in acc.index), default=math.nan) for loss in ("minor_dpo", "dpo")}
        gains.append((kind, beta, best["minor_dpo"] - best["dpo"]))
    big = [g for g in gains if g[2] >= 5]
    lines += [f"4. **Up to +5 accuracy points over DPO** — {_verdict(len(big), len(gains), partial='held in part')}. "
              "Rule: MinorDPO's best mean accuracy over learning rates minus DPO's is at least 5 points. Gains: "
              + ", ".join(f"{k} β={b:g}: {g:+.1f}" for k, b, g in gains) + "."]
    # 5. The sceptic's question: does preference learning beat plain SFT on the chosen answers?
    sft_best = {kind: max((acc.get((kind, "sft", lr), math.nan) for lr in lrs), default=math.nan)
                for kind in kinds(frame)}
    vs_sft = []
    for kind, beta in pairs:
        best = max((at(acc, kind, "minor_dpo", beta, lr) for lr in lrs
                    if (kind, f"minor_dpo β={beta:g}", lr) in acc.index), default=math.nan)
        if not math.isnan(sft_best[kind]):
            vs_sft.append((kind, beta, best - sft_best[kind]))
    if vs_sft:
        wins = [v for v in vs_sft if v[2] > 0]
        lines += [f"5. **Preference learning beats plain SFT on the chosen answers** (not a claim of the paper; the "
                  f"baseline a sceptic asks for) — {_verdict(len(wins), len(vs_sft), partial='only in part')}. "
                  "Rule: MinorDPO's best mean accuracy over learning rates exceeds SFT's. Differences: "
                  + ", ".join(f"{k} β={b:g}: {d:+.1f}" for k, b, d in vs_sft) + "."]
    return lines + [""]


def _verdict(yes: int, total: int, *, partial: str = "mixed") -> str:
    if total == 0:
        return "not tested"
    return "held" if yes == total else "did not hold" if yes == 0 else f"{partial} ({yes}/{total})"
