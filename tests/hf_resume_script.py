"""A tiny GPT-2 trained from dict samples (DataLoaders.from_datasets, shuffling, dropout), for exact-resume tests.

    python hf_resume_script.py OUT CKPT_DIR [--exit-at STEP] [--resume]

Writes OUT (a hash of the final weights and every training loss) when the fit returns; `--exit-at` kills the
process with os._exit(17) after that training step's checkpoint.
"""
import argparse
import hashlib
import json
import os

import torch
import transformers
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

from looplab import Callback, Checkpoint, DataLoaders, Learner

transformers.logging.set_verbosity_error()


class Tokens(Dataset):
    """Random token windows as dict samples, the way a tokenized Hugging Face dataset yields them."""

    def __init__(self, n, seed):
        self.ids = torch.randint(0, 64, (n, 12), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class Exit(Callback):
    order = 99  # after Checkpoint (95) wrote this step

    def __init__(self, at):
        self.at = at

    def after_batch(self):
        if self.learn.training and self.learn.train_iter == self.at:
            os._exit(17)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("ckpt")
    ap.add_argument("--exit-at", type=int)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=12, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.1, embd_pdrop=0.1,
                     attn_pdrop=0.1, use_cache=False, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    dls = DataLoaders.from_datasets(Tokens(40, 1), Tokens(8, 2), bs=8, seed=3)
    cbs = [Checkpoint(args.ckpt, every_n_steps=1, keep_last=2)]
    if args.exit_at is not None:
        cbs.append(Exit(args.exit_at))
    learn = Learner(model, dls, loss_func=None, lr=3e-3, cbs=cbs, progress=False)
    learn.fit(3, resume_from=args.ckpt if args.resume else None)
    weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    with open(args.out, "w") as f:
        json.dump({"weights": weights, "losses": learn.recorder.losses}, f)


if __name__ == "__main__":
    main()
