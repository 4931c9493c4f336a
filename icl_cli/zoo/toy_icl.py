"""The bundled toy ICL model (SPEC §10): a small Gemma trained on the built-in tasks.

    icl zoo train toy-icl                      # retrain the bundled weights (2-core CPU, ~25 min)
    icl zoo train toy-icl --out /tmp/toy --steps 200   # a quick trial elsewhere
    icl zoo eval toy-icl                       # re-measure the targets

Recipe:
1. A word-level tokenizer whose vocabulary is every word of the built-in tasks and templates
   (a word outside it is a clear error, never a silent unknown token; see core/batch.py).
2. Prompts in the paper template with 0-32 shots, all tasks mixed. Inputs overlap across tasks
   (the same English word feeds antonyms, translations, plurals, verb forms, the algorithmic
   tasks), so only the examples tell which task is meant.
3. The loss is on answer tokens only, on *every* pair of a prompt: one n-shot prompt trains the
   0..n-shot predictions at once.
4. AdamW with a one-cycle schedule; deterministic on CPU for a fixed seed.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from icl_cli.core.batch import token_roles
from icl_cli.core.prompts import DUMMY_PAIR, TEMPLATES, Prompt
from icl_cli.core.tasks import Task, builtin_tasks

TOY_DIR = Path(__file__).resolve().parent / "toy-icl"
PRETOKENIZE = r"\n|->|[,:]|[^\s,:>\-]+|[>\-]"
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


@dataclass
class ToyConfig:
    d_model: int = 128
    """Residual width."""
    n_layers: int = 6
    """Decoder blocks."""
    n_heads: int = 4
    """Attention heads (head_dim = d_model / n_heads)."""
    d_mlp: int = 512
    """MLP width."""
    steps: int = 2400
    """Optimiser steps."""
    batch: int = 32
    """Prompts per step."""
    lr: float = 3e-3
    """Peak learning rate of the one-cycle schedule."""
    max_shot: int = 32
    """Shots are drawn per batch from 0..max_shot."""
    seed: int = 0
    """Seed of initialisation and data order."""
    threads: int = 1
    """CPU threads (fixed so that runs are reproducible)."""


def build_tokenizer(tasks: dict[str, Task]):
    """A word-level fast tokenizer over every word of the tasks and the three templates."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="removed", invert=True)
    words: set[str] = set()
    texts = [t.prefix + t.before_x + t.sep + t.after_y for t in TEMPLATES.values()] + [" ".join(DUMMY_PAIR)]
    texts += [s for task in tasks.values() for pair in task.pairs for s in pair]
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(text))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=1024,
    )


def build_model(cfg: ToyConfig, tokenizer):
    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        head_dim=cfg.d_model // cfg.n_heads, max_position_embeddings=1024, hidden_activation="gelu_pytorch_tanh",
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(cfg.seed)
    return GemmaForCausalLM(config)


def training_batch(tokenizer, tasks: list[Task], rng: random.Random, batch: int, n_shot: int):
    """(input_ids [B,P], labels [B,P]) with labels only on the answer tokens of every pair."""
    prompts = []
    for _ in range(batch):
        task = rng.choice(tasks)
        k = min(n_shot, len(task.pairs) - 1)
        chosen = rng.sample(task.pairs, k + 1)
        prompts.append(Prompt(chosen[:-1], chosen[-1], "paper", True))
    enc = tokenizer([p.text for p in prompts], return_offsets_mapping=True)
    P = max(len(ids) for ids in enc["input_ids"])
    ids_t = torch.full((batch, P), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((batch, P), -100, dtype=torch.long)
    for b, (p, ids, offsets) in enumerate(zip(prompts, enc["input_ids"], enc["offset_mapping"])):
        ids_t[b, : len(ids)] = torch.tensor(ids)
        _, out_tokens, _ = token_roles(offsets, p.segments, len(p.pairs))
        for toks in out_tokens:
            for t in toks:
                labels[b, t] = ids[t]
    return ids_t, labels


CHECKPOINT = ".toy-checkpoint.safetensors"


def _save_checkpoint(path: Path, cfg: ToyConfig, step: int, model, opt, rng: random.Random, loss_ema, elapsed: float) -> None:
    """Weights, Adam state and the data RNG after ``step`` steps, in one file written atomically."""
    import os

    from safetensors.torch import save_file

    tensors = {f"model/{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        for k, v in opt.state[p].items():
            tensors[f"opt/{i}/{k}"] = v.detach().clone().contiguous()
    meta = {"step": step, "loss_ema": loss_ema, "elapsed": elapsed, "rng": rng.getstate(), "config": asdict(cfg)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})
    os.replace(tmp, path)


def _load_checkpoint(path: Path, cfg: ToyConfig, model, opt, rng: random.Random) -> tuple[int, float | None, float]:
    from safetensors import safe_open

    from icl_cli.core.errors import IclError

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta["config"] != asdict(cfg):
        raise IclError(f"the checkpoint {path} belongs to another configuration; delete it or train with its settings")
    model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
    params = list(model.parameters())
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, i, name = k.split("/", 2)
            opt.state[params[int(i)]][name] = v
    version, state, gauss = meta["rng"]
    rng.setstate((version, tuple(state), gauss))
    return meta["step"], meta["loss_ema"], meta["elapsed"]


def train(
    cfg: ToyConfig, out_dir: Path, progress: Callable[[int, int, float], None] | None = None,
    resume: bool = False, checkpoint_every: int = 100,
) -> dict:
    """Train the toy model and save it (HF layout) with its metadata into ``out_dir``.

    Every ``checkpoint_every`` steps the state is saved in ``out_dir``; ``resume`` continues from
    it and ends with the same weights as an uninterrupted run.
    """
    import warnings

    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    tasks = builtin_tasks()
    tokenizer = build_tokenizer(tasks)
    model = build_model(cfg, tokenizer)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    rng = random.Random(cfg.seed)
    task_list = list(tasks.values())
    start, loss_ema, first = time.time(), None, 0
    ckpt = out_dir / CHECKPOINT
    if resume and ckpt.exists():
        first, loss_ema, elapsed = _load_checkpoint(ckpt, cfg, model, opt, rng)
        start -= elapsed
        with warnings.catch_warnings():  # replay the schedule up to the checkpoint
            warnings.simplefilter("ignore")
            for _ in range(first):
                sched.step()
    out_dir.mkdir(parents=True, exist_ok=True)
    for step in range(first, cfg.steps):
        n_shot = rng.randint(0, cfg.max_shot)
        ids, labels = training_batch(tokenizer, task_list, rng, cfg.batch, n_shot)
        hidden = model.model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).last_hidden_state
        target = labels[:, 1:]
        keep = target != -100  # unembed only the positions that predict an answer token
        logits = model.lm_head(hidden[:, :-1][keep])
        loss = torch.nn.functional.cross_entropy(logits, target[keep])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        if progress:
            progress(step + 1, cfg.steps, loss_ema)
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < cfg.steps:
            _save_checkpoint(ckpt, cfg, step + 1, model, opt, rng, loss_ema, time.time() - start)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    meta = {"config": asdict(cfg), "train_seconds": round(time.time() - start, 1), "final_loss": round(loss_ema, 4),
            "n_params": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
            "tasks": {t.name: len(t.pairs) for t in task_list}}
    (out_dir / "toy_icl.json").write_text(json.dumps(meta, indent=2) + "\n")
    ckpt.unlink(missing_ok=True)
    return meta
