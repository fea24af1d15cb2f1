"""Published orderings checked in miniature (issue 32, item 4): each claim of a paper that the matrix can
test, written as data (docs/matrix_claims.yaml), is decided from the matrix's own numbers: the difference
of two methods (or a method and the teacher row) on one metric at the given step counts, with the paired
bootstrap and the Welch-over-seeds intervals of lcm.evaluation.stats.config_difference.

A claim:

    - paper: DMD2 (Yin et al. 2024, arXiv 2405.14867)
      claim: "..."                       # the paper's words or a marked paraphrase
      source: abstract                   # where the words are
      test: {method: DMD2, versus: LCD, metric: compose_fd, steps: [1, 2, 4], expect: lower}

expect: higher / lower (the method's value against versus'), or same (a "matches" claim: no step may
resolve a difference). Outcome per step: `as claimed` (every available interval excludes 0 on the claimed
side), `opposite` (excludes 0 on the other side), `not resolved`. Outcome of the claim: reproduced (every
step as claimed), contradicted (any step opposite), partly reproduced (some as claimed, none opposite),
not resolved; for expect same: consistent (nothing resolved) or contradicted. `not run` where the
matrix lacks the method, metric or step count."""
from __future__ import annotations

from typing import Callable

EXPECT = {"higher": 1, "lower": -1, "same": 0}
WORDS = {"higher": "higher than", "lower": "lower than", "same": "matches"}


def load(path: str) -> list[dict]:
    """The claims file (a YAML list), each entry checked for its fields; SystemExit names what is wrong."""
    import yaml
    try:
        with open(path) as f:
            claims = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise SystemExit(f"--claims {path}: cannot read it ({e})") from None
    if not isinstance(claims, list):
        raise SystemExit(f"--claims {path}: expected a YAML list of claims")
    for i, c in enumerate(claims):
        t = c.get("test") if isinstance(c, dict) else None
        missing = [k for k in ("paper", "claim", "source") if not isinstance(c, dict) or k not in c] + \
                  [f"test.{k}" for k in ("method", "versus", "metric", "steps", "expect") if not isinstance(t, dict) or k not in t]
        if missing:
            raise SystemExit(f"--claims {path}: claim {i + 1} lacks {', '.join(missing)}")
        if t["expect"] not in EXPECT:
            raise SystemExit(f"--claims {path}: claim {i + 1}: expect {t['expect']!r} is not one of {', '.join(EXPECT)}")
    return claims


def step_outcome(d: dict, expect: int) -> str:
    """One step's difference (config_difference's dict) against the claimed direction."""
    if not d["excludes_0"]:
        return "not resolved"
    side = 1 if d["diff"] > 0 else -1
    return "opposite" if expect == 0 else ("as claimed" if side == expect else "opposite")


def outcome(steps: list[str], expect: int) -> str:
    """The claim's outcome from its steps' outcomes (see the module's docstring)."""
    if not steps or "not run" in steps:
        return "not run"
    if "opposite" in steps:
        return "contradicted"
    if expect == 0:
        return "consistent"
    if all(s == "as claimed" for s in steps):
        return "reproduced"
    return "partly reproduced" if "as claimed" in steps else "not resolved"


def check(claims: list[dict], difference: Callable[[str, str, int, str], dict | None]) -> list[dict]:
    """Each claim with its per-step differences and outcome. difference(method, versus, steps, metric) ->
    config_difference's dict of method minus versus at that step count, None when either side lacks it."""
    out = []
    for c in claims:
        t = c["test"]
        expect = EXPECT[t["expect"]]
        rows = []
        for s in t["steps"]:
            d = difference(t["method"], t["versus"], int(s), t["metric"])
            rows.append(dict(steps=int(s), outcome="not run") if d is None else
                         dict(steps=int(s), outcome=step_outcome(d, expect), **d))
        out.append(dict(c, results=rows, outcome=outcome([r["outcome"] for r in rows], expect)))
    return out


def step_text(r: dict, k: str, fmt: Callable) -> str:
    """One step's cell: difference [paired bootstrap] {Welch over seeds} *outcome*."""
    if r["outcome"] == "not run":
        return f"{r['steps']}: not run"
    gen = f" [{fmt(r['gen_ci'][0], k)}, {fmt(r['gen_ci'][1], k)}]" if r["gen_ci"] else ""
    seed = f" {{{fmt(r['seed_ci'][0], k)}, {fmt(r['seed_ci'][1], k)}}}" if r["seed_ci"] else ""
    return f"{r['steps']}: {fmt(r['diff'], k)}{gen}{seed} *{r['outcome']}*"


def markdown(checked: list[dict], fmt: Callable) -> list[str]:
    """The report's section: a table per claim row (paper, claim, test, per-step differences, outcome)."""
    lines = ["## Published claims, checked in miniature", "",
             "Each claim tested as an ordering on this tier (the --claims file of the command that ends this page; "
             "demo/matrix_claims.py). Per step: "
             "method minus versus [paired bootstrap] {Welch over seeds}; *as claimed* / *opposite* when every available "
             "interval excludes 0 on that side. A claim is reproduced when every step is as claimed, contradicted "
             "when any is opposite; a \"matches\" claim (expect same) is consistent when no step resolves a difference. "
             "A small world and 400 student steps test the ordering, not the papers' scale.", "",
             "| paper | claim; source | test | per step | outcome |", "|---|---|---|---|---|"]
    for c in checked:
        t, k = c["test"], c["test"]["metric"]
        lines.append(f"| {c['paper']} | {c['claim']}; source: {c['source']} | {t['method']} {WORDS[t['expect']]} "
                     f"{t['versus']} on `{k}` | {'; '.join(step_text(r, k, fmt) for r in c['results'])} | **{c['outcome']}** |")
    return lines + [""]
