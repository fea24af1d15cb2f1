"""Write the notebooks in this folder from their Python sources in notebooks/src/ (no outputs).

    python notebooks/build_notebooks.py            # rewrite every notebook
    python notebooks/build_notebooks.py --check    # exit 1 if a notebook differs from its source

One source per notebook (notebooks/src/<name>.py, a list CELLS of md(...) / code(...) cells; the
shared first cell and the helpers are in notebooks/src/nbcells.py). The notebooks only import the
project's modules (solvers/, lcm/, models/, demo/); the math lives there. They read the demo assets
(teacher, LCM-LoRA, style LoRA, evaluator) from $LCM_DEMO_DIR, default ../assets.
tests/test_notebooks.py executes every notebook and checks they match their sources.
"""
import argparse
import importlib
import os
import sys

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "src"))
NAMES = ("consistency_function", "pf_ode_solvers", "lcd_step", "lora_task_arithmetic", "few_step_parametrizations",
         "distribution_matching", "continuous_time")
NOTEBOOKS = {f"{n}.ipynb": importlib.import_module(n).CELLS for n in NAMES}


def build(cells) -> nbformat.NotebookNode:
    """A fresh notebook (no outputs) for the project's venv kernel."""
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, c in enumerate(nb.cells):
        c["id"] = f"cell-{i:02d}"                           # stable ids: rebuilding changes nothing
    return nb


def render(name: str) -> str:
    return nbformat.writes(build(NOTEBOOKS[name])) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--check", action="store_true", help="only compare; exit 1 if a notebook is stale")
    args = p.parse_args()
    stale = []
    for name in NOTEBOOKS:
        path = os.path.join(HERE, name)
        text = render(name)
        old = open(path).read() if os.path.exists(path) else None
        if old != text:
            stale.append(name)
            if not args.check:
                with open(path, "w") as f:
                    f.write(text)
    if args.check and stale:
        print(f"stale notebooks (run python notebooks/build_notebooks.py): {stale}", file=sys.stderr)
        return 1
    print(("stale: " if args.check else "written: ") + (", ".join(stale) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
