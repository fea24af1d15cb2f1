"""Write the notebooks in this folder from their Python sources in notebooks/src/, executed, with outputs.

    python notebooks/build_notebooks.py                    # build, execute, write every notebook (minutes)
    python notebooks/build_notebooks.py lcd_step ...       # only these notebooks
    python notebooks/build_notebooks.py --no-execute       # quick edit: cells only, no outputs (do not commit)
    python notebooks/build_notebooks.py --check            # exit 1 if a notebook's cells differ from its source

One source per notebook (notebooks/src/<name>.py, a list CELLS of md(...) / code(...) cells; the
shared first cell and the helpers are in notebooks/src/nbcells.py). The notebooks only import the
project's modules (solvers/, lcm/, models/, demo/); the math lives there. They read the demo assets
(teacher, LCM-LoRA, style LoRA, evaluator) from $LCM_DEMO_DIR, default ../assets.

The committed notebooks carry their outputs, so their figures show where people read them. They are
executed one at a time by this venv's python3 kernel in notebooks/, with OMP_NUM_THREADS=1 (`execute`,
the same call tests/test_notebooks.py makes); timing metadata and the kernel's version details are
dropped, so a rebuild only differs where an output does. `--check` compares what the source
determines (cell order, ids, types and sources), never outputs.
"""
import argparse
import importlib
import os
import sys
import time

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "src"))
NAMES = ("consistency_function", "pf_ode_solvers", "lcd_step", "lora_task_arithmetic", "few_step_parametrizations",
         "distribution_matching", "continuous_time")
NOTEBOOKS = {f"{n}.ipynb": importlib.import_module(n).CELLS for n in NAMES}
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def build(cells) -> nbformat.NotebookNode:
    """A fresh notebook (no outputs) for the project's venv kernel."""
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    for i, c in enumerate(nb.cells):
        c["id"] = f"cell-{i:02d}"                           # stable ids: rebuilding changes nothing
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"

#----------------------------------------------------------------------------
# Execution: one kernel per notebook, this interpreter, working dir notebooks/.

def kernel_env() -> dict:
    """The kernel's environment: ours, the demo assets, one thread (tiny models; no oversubscription)."""
    return {**os.environ, "LCM_DEMO_DIR": os.environ.get("LCM_DEMO_DIR", os.path.join(ROOT, "assets")),
            "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def execute(nb: nbformat.NotebookNode, timeout: int = 600) -> nbformat.NotebookNode:
    """Run every cell top to bottom in place (raises nbclient's CellExecutionError on the first error),
    then drop what changes from run to run without the outputs changing: timings, kernel versions."""
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    km = KernelManager(kernel_name="python3")
    assert km.format_kernel_cmd()[0] == sys.executable, "the kernel must run this venv's interpreter"
    NotebookClient(nb, km=km, timeout=timeout, record_timing=False,
                   resources={"metadata": {"path": HERE}}).execute(env=kernel_env())
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}      # the kernel wrote its Python version here
    for c in nb.cells:
        c.metadata.pop("execution", None)
        if c.cell_type == "code":                          # one stream output per run of prints, however it
            merged = []                                    # was flushed (the split varies from run to run)
            for o in c.outputs:
                if merged and o.output_type == "stream" == merged[-1].output_type and o.name == merged[-1].name:
                    merged[-1].text += o.text
                else:
                    merged.append(o)
            c.outputs = merged
    return nb

#----------------------------------------------------------------------------
# Check: the committed cells against the source (outputs and execution counts are not compared).

def check(name: str, folder: str = HERE) -> str | None:
    """None if folder/name has the source's cells (order, ids, types, sources); else the first difference."""
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return f"{name}: missing"
    want, have = build(NOTEBOOKS[name]).cells, nbformat.read(path, as_version=4).cells
    for i, (w, h) in enumerate(zip(want, have)):
        for key in ("id", "cell_type", "source"):
            if w.get(key) != h.get(key):
                return (f"{name}: cell {i} ({w['id']}, {w.cell_type}) differs from notebooks/src/{name[:-6]}.py "
                        f"in its {key}; first line there: {(w.source.splitlines() or [''])[0][:60]!r}")
    if len(want) != len(have):
        return f"{name}: {len(have)} cells, the source has {len(want)}"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("names", nargs="*", help="notebooks to build (default: all), e.g. lcd_step")
    p.add_argument("--check", action="store_true", help="only compare cells with the sources; exit 1 if one differs")
    p.add_argument("--no-execute", action="store_true", help="write without outputs (quick edits; not for commits)")
    p.add_argument("--dir", default=HERE, help="folder of the notebooks (default: this one)")
    args = p.parse_args(argv)
    names = [n if n.endswith(".ipynb") else f"{n}.ipynb" for n in args.names] or list(NOTEBOOKS)
    unknown = sorted(set(names) - set(NOTEBOOKS))
    if unknown:
        p.error(f"no source for {unknown}; known: {', '.join(NAMES)}")
    if args.check:
        stale = [msg for msg in (check(n, args.dir) for n in names) if msg]
        for msg in stale:
            print(msg, file=sys.stderr)
        if stale:
            print("rebuild them: python notebooks/build_notebooks.py [name ...]", file=sys.stderr)
            return 1
        print(f"{len(names)} notebooks match their sources")
        return 0
    for name in names:
        path, t0 = os.path.join(args.dir, name), time.time()
        nb = build(NOTEBOOKS[name])
        if not args.no_execute:
            execute(nb)
        with open(path, "w") as f:
            f.write(render(nb))
        print(f"written: {name} ({os.path.getsize(path) / 1e3:.0f} kB, {time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
