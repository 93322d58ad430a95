"""`tune`'s ensemble step: is the budget better spent on two half-size adapters than on one full-size one?

The two finalists are each filled again to half the budget (so that together they fit it, heads included), trained
at the top rung's steps on the winner's seed (so they are validated on the same rows as the winner's own run), and
their validation-calibrated probabilities (val_probabilities.csv) averaged, as `predict RUN RUN` averages them. The
ensemble is kept only when it beats the winner's run at the same steps at 95% on those rows (`choice.paired_choice`
with the ensemble as the costlier contender: it answers with two models), so a difference that is noise keeps the
single adapter."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from budgetlora import runs
from budgetlora.config import Config, ConfigError
from budgetlora.errors import RunFolderError
from budgetlora.experiments.choice import paired_choice
from budgetlora.experiments.space import candidate_space

MEMBERS = 2
SUFFIX = "@half"  # a member's variant name: the finalist's name, filled to half the budget
FOLDER = "ensemble"  # OUT/ensemble/val_predictions.csv: the ensemble's validation answers, as a run's


def half_variants(cfg: Config, finalists: list[str], overrides) -> dict[str, dict] | None:
    """{finalist@half: its overrides of cfg at half the budget}, or None when the finalists are not two or half the
    budget holds no member (a head as large as half of it). The members keep the full budget in their configs:
    each fits it alone, and the ensemble's sum is checked against it."""
    if len(finalists) < MEMBERS:
        return None
    try:
        half = {c.name: c for c in candidate_space(cfg.replace(**{"budget.max_params": cfg.budget.max_params
                                                                  // MEMBERS}))}
    except ConfigError:
        return None
    if any(n not in half for n in finalists[:MEMBERS]):
        return None
    out = {}
    for n in finalists[:MEMBERS]:
        v = overrides(cfg, half[n].cfg)
        v.pop("budget.max_params", None)
        out[n + SUFFIX] = v
    return out


def read_probabilities(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """(source rows, probabilities) from a run's val_probabilities.csv, sorted by row; malformed: one
    RunFolderError naming the file."""
    path = Path(run) / runs.VAL_PROBABILITIES
    try:
        with warnings.catch_warnings():  # an empty file is refused below, not warned about
            warnings.simplefilter("ignore")
            table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
        if table.shape[1] < 3 or not len(table) or not np.isfinite(table).all():
            raise ValueError
    except (ValueError, OSError):
        raise RunFolderError(f"{path} is missing or corrupt: expected rows of row,p_0,...,p_n numbers") from None
    table = table[np.argsort(table[:, 0], kind="stable")]
    return table[:, 0].astype(np.int64), table[:, 1:]


def ensemble_answers(member_runs: list[Path], out: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Average the members' calibrated validation probabilities into OUT/ensemble/val_predictions.csv (row, gold,
    the ensemble's answer), gold from the first member's answers; members validated on other rows are refused.
    Returns (that folder, gold, answers), the latter two sorted by row."""
    from budgetlora.experiments.choice import read_val_answers

    rows, gold, _ = read_val_answers(member_runs[0])
    total = None
    for run in member_runs:
        r, p = read_probabilities(run)
        if not np.array_equal(r, rows):
            raise ConfigError(f"ensemble member {run} was validated on other rows than {member_runs[0]}")
        total = p if total is None else total + p
    folder = out / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    answer = total.argmax(axis=1)
    runs.write_text(folder / runs.VAL_PREDICTIONS, "row,label,predicted\n" + "".join(
        f"{a},{b},{c}\n" for a, b, c in zip(rows.tolist(), gold.tolist(), answer.tolist())))
    return folder, gold, answer


def judge(single: dict, member_runs: list[Path], out: Path, objective: str, num_labels: int) -> dict:
    """The ensemble of `member_runs` against `single` ({"name", "run", "value", "samples_s"}: the winner's run at the
    same steps and seed), paired on the same validation rows. Returns paired_choice's record with "kept"."""
    from budgetlora.tasks import macro_f1

    folder, gold, answer = ensemble_answers(member_runs, out)
    value = macro_f1(gold, answer, num_labels) if objective == "val_macro_f1" else float(np.mean(gold == answer))
    contenders = [{"name": single["name"], "runs": [single["run"]], "values": [single["value"]],
                   "samples_s": single["samples_s"]},
                  {"name": FOLDER, "runs": [folder], "values": [value], "samples_s": 0.0}]
    choice = paired_choice(contenders, objective, num_labels)
    return {**choice, "kept": choice["winner"] == FOLDER, "members": [str(r) for r in member_runs],
            "value": value, "single_value": single["value"]}
