"""The demo text tower's caption pretraining (demo/text.py): it learns to read every attribute
from the features the UNet sees, and its file round-trips into the teacher's TextConditioner."""

import torch

from demo.arch import TEACHER_ARCH
from demo.text import caption_batch, load_text, pretrain_text, save_text
from demo.world import CONTENT


def test_caption_batch_marks_positions_from_eot():
    prompts = ["a small red circle at the top left on a blue background",
               "a large cyan diamond in the center on a black background"]
    tokens, mask, labels = caption_batch(prompts)
    eot = (tokens == 49407).int().argmax(-1)
    for row, e in zip(mask, eot.tolist()):
        assert not row[:e].any() and row[e:].all()             # whole caption read from EOT on
    assert labels.shape == (2, len(CONTENT))
    assert labels[0].tolist() != labels[1].tolist()


def test_pretraining_reads_all_attributes_and_round_trips(tmp_path):
    (cfg,) = TEACHER_ARCH["text"]["towers"]
    text, acc = pretrain_text(cfg, steps=120, batch=64, seed=0)
    # Colour and background words are the same kind of token: a random tower confuses whose
    # colour is whose; the pretrained features must tell them apart for every caption.
    assert set(acc) == set(CONTENT)
    assert min(acc.values()) >= 0.95, acc
    path = tmp_path / "text.safetensors"
    save_text(text, str(path), acc)
    back = load_text(str(path))
    assert back.config == text.config
    prompts = ["a small red circle at the top left on a blue background", ""]
    torch.testing.assert_close(back.encode(prompts).context, text.encode(prompts).context, rtol=0, atol=0)
    assert not any(p.requires_grad for p in back.parameters())
