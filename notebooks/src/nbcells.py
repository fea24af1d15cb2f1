"""Cell helpers and the shared first cell of every notebook (imported by the notebook sources)."""
import textwrap

import nbformat


def md(text: str):
    return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str):
    return nbformat.v4.new_code_cell(textwrap.dedent(text).strip())

#----------------------------------------------------------------------------
# Shared first cell: import path, demo folder, plotting (pure plotting helpers only).

SETUP = '''
%matplotlib inline
import os
import sys

ROOT = os.path.abspath("..")                    # the notebooks run from notebooks/
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
DEMO = os.environ.get("LCM_DEMO_DIR", os.path.join(ROOT, "assets"))   # demo teacher, LoRAs, evaluator

import warnings

import matplotlib.pyplot as plt
import torch

warnings.filterwarnings("ignore", message="IProgress not found")   # tqdm without ipywidgets
torch.set_grad_enabled(False)                   # inference only unless a cell says otherwise
torch.manual_seed(0)                            # draws without a generator repeat from build to build
plt.rcParams.update({"figure.dpi": 90, "font.size": 8, "axes.titlesize": 8})   # PNGs stored in the notebooks: modest dpi


def show_grid(images, rows, cols, title=None, size=1.1):
    """Plot images (len(rows) * len(cols), 3, H, W) in [0, 1] as a labelled grid."""
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(size * len(cols), size * len(rows) + 0.3),
                             squeeze=False)
    for ax, img in zip(axes.flat, images):
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).cpu().numpy())
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    for ax, c in zip(axes[0], cols):
        ax.set_title(c)
    for ax, r in zip(axes[:, 0], rows):
        ax.set_ylabel(r, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    plt.show()
'''
