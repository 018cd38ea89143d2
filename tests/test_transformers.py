"""Third-party models (issue 11): transformers GPT-2 and BERT built from configs (no download), dict batches,
the model's own loss, structured outputs through every feature, compiled models — against hand-written loops."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.modeling_outputs import ModelOutput  # noqa: E402
from transformers.models.gpt2.modeling_gpt2 import GPT2Block  # noqa: E402

from looplab import (EMA, ActivationCheckpointing, Callback, GradientAccumulation,  # noqa: E402
                     GradientClip, Learner, MixedPrecision, MixUp)
from looplab.callbacks import Compile  # noqa: E402

transformers.logging.set_verbosity_error()
VOCAB, SEQ = 64, 12


def gpt2(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, resid_pdrop=dropout,
                     embd_pdrop=dropout, attn_pdrop=dropout, use_cache=False, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=SEQ, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def lm_batches(n, bs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (bs, SEQ), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def cls_batches(n, bs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (bs, SEQ), generator=g)
        mask = (torch.rand(bs, SEQ, generator=g) > 0.2).long()
        mask[:, 0] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (bs,), generator=g)})
    return out


def sgd(params, lr):
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def assert_close_params(a, b, tol=1e-6):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)


def test_gpt2_dict_batches_with_its_own_loss_equal_a_hand_written_loop():
    train, valid = lm_batches(5), lm_batches(3, bs=3, seed=1)
    ref = gpt2()
    opt = sgd(ref.parameters(), lr=0.05)
    for _ in range(2):
        ref.train()
        for batch in train:
            ref(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
    learn = Learner(gpt2(), (train, valid), loss_func=None, opt_func=sgd, lr=0.05, progress=False)
    learn.fit(2)
    assert_close_params(learn.model, ref)
    ref.eval()
    with torch.no_grad():  # the model's own loss, averaged per sample over the validation batches
        total = sum(ref(**b).loss * len(b["labels"]) for b in valid)
    expected = total / sum(len(b["labels"]) for b in valid)
    assert learn.recorder.history[-1]["valid_loss"] == pytest.approx(float(expected), rel=1e-5)


def test_bert_dict_batches_equal_pairs_with_cross_entropy():
    train = cls_batches(6)
    a = Learner(bert(), (train, cls_batches(2, seed=1)), loss_func=None, opt_func=sgd, lr=0.05, progress=False)
    a.fit(2)
    pairs = [((b["input_ids"], b["attention_mask"]), b["labels"]) for b in train]
    valid_pairs = [((b["input_ids"], b["attention_mask"]), b["labels"]) for b in cls_batches(2, seed=1)]
    b = Learner(bert(), (pairs, valid_pairs), loss_func=lambda out, y: F.cross_entropy(out.logits, y),
                opt_func=sgd, lr=0.05, progress=False)
    b.fit(2)
    assert_close_params(a.model, b.model)
    assert a.recorder.history[-1]["valid_loss"] == pytest.approx(b.recorder.history[-1]["valid_loss"], rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_precision_keeps_the_model_output_type_with_float32_logits(dtype):
    seen = []

    class Look(Callback):
        order = 100

        def after_pred(self):
            pred = self.learn.pred
            seen.append((type(pred), pred.logits.dtype, isinstance(pred, ModelOutput), pred["logits"].dtype))

        def after_loss(self):
            assert self.learn.loss.dtype == torch.float32

    learn = Learner(gpt2(), (lm_batches(2), lm_batches(1, seed=1)), loss_func=None, lr=1e-3, progress=False,
                    cbs=[MixedPrecision(dtype), Look()])
    learn.fit(1)
    assert seen and all(t.__name__ == "CausalLMOutputWithCrossAttentions" and d1 == d2 == torch.float32 and mo
                        for t, d1, mo, d2 in seen)


def test_get_preds_keeps_the_structure():
    valid = lm_batches(3, bs=3, seed=1)
    learn = Learner(gpt2(), (lm_batches(2), valid), loss_func=None, progress=False)
    preds, targets = learn.get_preds()
    model = learn.model.eval()
    with torch.no_grad():
        logits = torch.cat([model(**b).logits for b in valid])
    assert isinstance(preds, dict) and set(preds) == {"logits"}  # the scalar loss is not a per-item value
    torch.testing.assert_close(preds["logits"], logits)
    assert torch.equal(targets, torch.cat([b["labels"] for b in valid]))
    # batches without targets: targets are None
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in valid]
    preds, targets = learn.get_preds(dl=no_labels)
    assert targets is None and preds["logits"].shape == logits.shape


def test_activation_checkpointing_of_gpt2_blocks_gives_the_same_gradients():
    batch = lm_batches(1)[0]
    grads = []
    for ac in (False, True):
        class Grab(Callback):
            order = 100

            def after_backward(self):
                grads.append([p.grad.clone() for p in self.learn.model.parameters()])
                raise CancelStepOnce
        cbs = [Grab()] + ([ActivationCheckpointing(GPT2Block)] if ac else [])
        learn = Learner(gpt2(dropout=0.1), ([batch], None), loss_func=None, lr=1e-3, progress=False, cbs=cbs)
        torch.manual_seed(5)
        try:
            learn.fit(1)
        except CancelStepOnce:
            pass
        if ac:
            assert cbs[1].n_wrapped == 2
    for g, h in zip(*grads):
        torch.testing.assert_close(g, h, rtol=1e-6, atol=1e-6)


class CancelStepOnce(Exception):
    pass


def test_every_feature_runs_on_a_transformers_model():
    learn = Learner(gpt2(dropout=0.1), (lm_batches(4), lm_batches(2, seed=1)), loss_func=None, lr=1e-3,
                    progress=False,
                    cbs=[MixedPrecision(torch.bfloat16), GradientClip(1.0), GradientAccumulation(2),
                         ActivationCheckpointing(GPT2Block), EMA(decay=0.9)])
    before = copy.deepcopy(learn.model.state_dict())
    res = learn.lr_find(num_it=5)
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in before.items())
    assert len(res.lrs) >= 2
    learn.fit_warmup_cos(2, lr=1e-3)
    assert len(learn.recorder.history) == 2 and all(r["valid_loss"] == r["valid_loss"] for r in learn.recorder.history)


def test_mixup_refuses_a_model_loss_and_dict_inputs_without_a_key():
    learn = Learner(gpt2(), (lm_batches(2), None), loss_func=None, progress=False)
    with pytest.raises(ValueError, match="loss_func"):
        learn.fit(1, cbs=[MixUp()])
    learn.loss_func = lambda out, y: F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
    with pytest.raises(TypeError, match="key="):
        learn.fit(1, cbs=[MixUp()])


def test_bad_batches_and_a_missing_loss_are_clear_errors():
    x = torch.randint(0, VOCAB, (4, SEQ))
    with pytest.raises(TypeError, match="a Tensor"):
        Learner(gpt2(), ([x], None), loss_func=None, progress=False).fit(1)
    with pytest.raises(TypeError, match="tuple of length 3"):
        Learner(gpt2(), ([(x, x, x)], None), loss_func=None, progress=False).fit(1)
    no_labels = [{"input_ids": x}]
    with pytest.raises(ValueError, match="loss_func=None needs a model that returns its loss"):
        Learner(gpt2(), (no_labels, None), loss_func=None, progress=False).fit(1)
    plain = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="Tensor without one"):
        Learner(plain, ([(torch.randn(2, 3), torch.zeros(2))], None), progress=False).fit(1)


# ---- compiled models -----------------------------------------------------------------------------------------
def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def pair_batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("how", ["user", "callback"])
def test_a_compiled_model_trains_like_eager_and_saves_plain_keys(tmp_path, how):
    data = (pair_batches(), pair_batches(2, seed=1))
    eager = Learner(small_net(), data, F.cross_entropy, opt_func=sgd, lr=0.1, progress=False)
    eager.fit(2)
    net = small_net()
    if how == "user":
        learn = Learner(torch.compile(net, backend="eager"), data, F.cross_entropy, opt_func=sgd, lr=0.1,
                        progress=False, cbs=[EMA(decay=0.5)])
        learn.fit(2)
    else:
        learn = Learner(net, data, F.cross_entropy, opt_func=sgd, lr=0.1, progress=False, cbs=[EMA(decay=0.5)])
        learn.fit(2, cbs=[Compile(backend="eager")])
        assert learn.model is net
    assert_close_params(net, eager.model)
    learn.save(tmp_path / "m.pt")
    saved = torch.load(tmp_path / "m.pt", weights_only=True)["model"]
    assert list(saved) == list(small_net().state_dict())
    plain = Learner(small_net(seed=3), data, F.cross_entropy, opt_func=sgd, progress=False)
    plain.load(tmp_path / "m.pt")
    assert_close_params(plain.model, net, tol=0)
    ema = [cb for cb in learn.cbs if isinstance(cb, EMA)][0]
    assert list(ema.state_dict()["ema"]) == list(saved)


# ---- exact resume with dict samples ----------------------------------------------------------------------------
SCRIPT = Path(__file__).with_name("hf_resume_script.py")


def run_script(*args, timeout=240):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=env, timeout=timeout,
                          capture_output=True, text=True)


def test_dict_batch_run_killed_mid_epoch_resumes_bit_identically(tmp_path):
    full = run_script(tmp_path / "full.json", tmp_path / "ck_full")
    assert full.returncode == 0, full.stderr
    killed = run_script(tmp_path / "x.json", tmp_path / "ck", "--exit-at", 7)
    assert killed.returncode == 17, killed.stderr
    assert not (tmp_path / "x.json").exists()
    resumed = run_script(tmp_path / "resumed.json", tmp_path / "ck", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = json.loads((tmp_path / "full.json").read_text()), json.loads((tmp_path / "resumed.json").read_text())
    assert a["weights"] == b["weights"] and a["losses"] == b["losses"]
