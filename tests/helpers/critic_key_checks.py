"""Checks that every `critic`, `critic.reward` and `pretrain` key changes behaviour (collected into
test_keys.KEY_CHECKS). They run on the marker corpus of tests/test_critic.py with a few stage-1 and stage-2
steps, or call the function the trainer calls with that key (`make_reward`, the scheme's `step_weights`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2ForSequenceClassification

from helpers.critic_runs import setup_for
from wmtp.config import DataSource
from wmtp.data.sequences import train_bpe_tokenizer
from wmtp.data.sources import Example, read_source
from wmtp.training.trainer import Trainer
from wmtp.weighting.rewards import RewardSettings, make_reward

MBPP = Path(__file__).resolve().parents[2] / "data" / "mbpp"
SHORT = {"max_steps": 4, "eval_every": 2, "early_stopping": "none"}


def trainer(kit, name: str, critic: dict | None = None, pretrain: dict | None = None, train: dict | None = None,
            **options) -> Trainer:
    setup = setup_for(kit.tmp, critic=critic, pretrain={**SHORT, **(pretrain or {})} if pretrain is not False
                      else False, train=train, **options)
    return Trainer(setup, kit.tmp / "runs" / name, run_name=name)


def run(kit, name: str, **kwargs) -> Trainer:
    t = trainer(kit, name, **kwargs)
    assert t.run()["status"] == "FINISHED"
    return t


def step_weights(t: Trainer) -> torch.Tensor:
    """The scheme's weights on the first training micro-batch, after stage 1."""
    t.scheme.before_training(t.hooks())
    (w,) = t.scheme.step_weights(t.step_batches()[:1])
    return w


def head_state(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.scheme.head.state_dict().items()}


def differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def stage1_steps(t: Trainer) -> int:
    return int(t.scheme.stage1_meta["steps"])


# ------------------------------------------------------------------------------------------------ rewards
def mbpp_examples(n: int = 3) -> list[Example]:
    return read_source(DataSource(kind="mbpp", dataset="mbpp", split="test", limit=n), {"mbpp": str(MBPP)})


def check_reward_kind(kit) -> None:
    """`reward.kind` picks the source: dataset labels (1/0 by the marker) or a user function (constant)."""
    module = kit.tmp / "constant_reward.py"
    module.write_text("def reward(examples):\n    return [0.25 for _ in examples]\n")
    kit.monkeypatch.syspath_prepend(str(kit.tmp))
    labels = setup_for(kit.tmp, pretrain=False)
    function = setup_for(kit.tmp, critic={"reward": {"kind": "function", "function": "constant_reward:reward"}},
                         pretrain=False)
    for setup, expected in ((labels, {0.0, 1.0}), (function, {0.25})):
        rewards = setup.scheme.value.train_rewards
        assert set(rewards.reward[rewards.terminal].tolist()) == expected


def check_reward_check(kit) -> None:
    """`reward.check`: `tests` runs the MBPP asserts (a wrong function scores 0), `parses` only compiles it (1)."""
    wrong = [Example(ex.prompt, ex.completion.replace("return ", "return None and "), ex.source, ex.key, ex.meta)
             for ex in mbpp_examples(2)]
    assert make_reward(RewardSettings(kind="verifiable", check="tests"))(wrong) == [0.0, 0.0]
    assert make_reward(RewardSettings(kind="verifiable", check="parses"))(wrong) == [1.0, 1.0]


def check_reward_timeout_s(kit) -> None:
    """`reward.timeout_s` bounds each program: a correct but slow solution passes only with a long enough limit."""
    (ex,) = mbpp_examples(1)
    slow = [Example(ex.prompt, "import time\ntime.sleep(1.5)\n" + ex.completion, ex.source, ex.key, ex.meta)]
    assert make_reward(RewardSettings(kind="verifiable", timeout_s=0.5))(slow) == [0.0]
    assert make_reward(RewardSettings(kind="verifiable", timeout_s=20))(slow) == [1.0]


def classifier(kit, name: str, seed: int, labels: int) -> str:
    directory = kit.tmp / name
    if not directory.exists():
        tokenizer = train_bpe_tokenizer(["def f(x):\n    return x + 1\n", "alpha beta gamma"] * 20, 280, 2)
        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=64,
                            num_labels=labels, pad_token_id=tokenizer.pad_token_id)
        GPT2ForSequenceClassification(config).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return str(directory)


TEXTS = [Example("", "def f(x):\n    return x + 1\n", "jsonl:t", "t/0"), Example("", "alpha beta", "jsonl:t", "t/1")]


def check_reward_model(kit) -> None:
    """`reward.model` names the classifier: two different models score the same texts differently."""
    a = make_reward(RewardSettings(kind="reward_model", model=classifier(kit, "rm_a", 0, 1)))(TEXTS)
    b = make_reward(RewardSettings(kind="reward_model", model=classifier(kit, "rm_b", 1, 1)))(TEXTS)
    assert a != b


def check_reward_positive_label(kit) -> None:
    """`reward.positive_label` picks which label's probability is the reward."""
    model = classifier(kit, "rm_two", 0, 2)
    first = make_reward(RewardSettings(kind="reward_model", model=model, positive_label=0))(TEXTS)
    last = make_reward(RewardSettings(kind="reward_model", model=model, positive_label=1))(TEXTS)
    assert [round(x + y, 5) for x, y in zip(first, last, strict=True)] == [1.0, 1.0] and first != last


def check_reward_batch_size(kit) -> None:
    """`reward.batch_size` is how many texts go through the classifier per forward (same scores either way)."""
    model = classifier(kit, "rm_a", 0, 1)
    calls = []
    for size in (1, 2):
        score = make_reward(RewardSettings(kind="reward_model", model=model, batch_size=size))
        forward = score.model.forward
        kit.monkeypatch.setattr(score.model, "forward",
                                lambda *a, _f=forward, _size=size, **k: calls.append(_size) or _f(*a, **k))
        score(TEXTS)
    assert calls.count(1) == 2 and calls.count(2) == 1


def check_reward_function(kit) -> None:
    """`reward.function` names the user's function: two functions, two rewards."""
    (kit.tmp / "two_rewards.py").write_text("def low(examples):\n    return [0.0] * len(examples)\n"
                                            "def length(examples):\n    return [len(e.completion) for e in examples]\n")
    kit.monkeypatch.syspath_prepend(str(kit.tmp))
    assert make_reward(RewardSettings(kind="function", function="two_rewards:low"))(TEXTS) == [0.0, 0.0]
    lengths = make_reward(RewardSettings(kind="function", function="two_rewards:length"))(TEXTS)
    assert lengths == [float(len(e.completion)) for e in TEXTS]


def check_incorrect_solutions(kit, where: str) -> None:
    """`incorrect_solutions` adds CodeContests' incorrect Python solutions as examples with label 0."""
    record = {"name": "p", "description": "Print 3.", "public_tests": {"input": [""], "output": ["3\n"]},
              "solutions": {"language": [3], "solution": ["print(3)\n"]},
              "incorrect_solutions": {"language": [3, 3], "solution": ["print(4)\n", "print(5)\n"]}}
    path = kit.tmp / "cc.jsonl"
    path.write_text(json.dumps(record) + "\n")
    plain = read_source(DataSource(kind="codecontests", dataset="cc"), {"cc": str(path)})
    both = read_source(DataSource(kind="codecontests", dataset="cc", incorrect_solutions=True), {"cc": str(path)})
    assert [e.meta["label"] for e in plain] == [1] and [e.meta["label"] for e in both] == [1, 0, 0]


# ---------------------------------------------------------------------------------------------- stage 2
def check_gamma(kit) -> None:
    """`critic.gamma` discounts: the value targets and the TD errors (hence the weights) change."""
    assert not torch.equal(step_weights(trainer(kit, "g1", critic={"gamma": 1.0})),
                           step_weights(trainer(kit, "g2", critic={"gamma": 0.5})))


def check_lam(kit) -> None:
    """`critic.lam` mixes n-step returns in TD(λ) targets: stage 1 fits different targets."""
    a = run(kit, "l1", critic={"lam": 0.0}, train={"max_steps": 1})
    b = run(kit, "l2", critic={"lam": 1.0}, train={"max_steps": 1})
    assert differ(head_state(a), head_state(b))


def check_target(kit) -> None:
    """`critic.target`: Monte-Carlo returns vs TD(λ) bootstrapped targets give different value heads."""
    a = run(kit, "t1", critic={"target": "mc"}, train={"max_steps": 1})
    b = run(kit, "t2", critic={"target": "td_lambda"}, train={"max_steps": 1})
    assert differ(head_state(a), head_state(b))


def check_advantage(kit) -> None:
    """`critic.advantage`: one-step δ vs GAE(λ) give different weights."""
    assert not torch.equal(step_weights(trainer(kit, "a1", critic={"advantage": "td"})),
                           step_weights(trainer(kit, "a2", critic={"advantage": "gae"})))


def check_temperature(kit) -> None:
    """`critic.temperature`: a lower T sharpens the weights (larger spread)."""
    sharp = step_weights(trainer(kit, "T1", critic={"temperature": 0.3}))
    flat = step_weights(trainer(kit, "T2", critic={"temperature": 3.0}))
    assert sharp.std() > flat.std()


def check_critic_eps(kit) -> None:
    """`critic.eps` is the clip floor: a higher floor lifts the smallest weights."""
    low = step_weights(trainer(kit, "e1", critic={"eps": 0.0, "temperature": 0.2}))
    high = step_weights(trainer(kit, "e2", critic={"eps": 0.8, "temperature": 0.2}))
    assert high[high > 0].min() > low[low > 0].min()


def check_critic_w_max(kit) -> None:
    """`critic.w_max` is the clip ceiling: a low one bounds the largest weights."""
    capped = step_weights(trainer(kit, "w1", critic={"w_max": 1.2, "temperature": 0.2}))
    free = step_weights(trainer(kit, "w2", critic={"w_max": 50.0, "temperature": 0.2}))
    assert capped.max() < free.max()


def check_value_hidden(kit) -> None:
    """`critic.value_hidden` is the value head's width (0: linear)."""
    sizes = [sum(p.numel() for p in trainer(kit, f"v{w}", critic={"value_hidden": w}).scheme.head.parameters())
             for w in (0, 8)]
    assert sizes == [64 * 2 + 65, 64 * 2 + 64 * 8 + 8 + 9]


def check_value_head_path(kit) -> None:
    """`critic.value_head_path` loads a trained value head and skips stage 1."""
    first = run(kit, "source", train={"max_steps": 1})
    given = trainer(kit, "given", critic={"value_head_path": str(kit.tmp / "runs" / "source")}, pretrain=False)
    saved = load_file(kit.tmp / "runs" / "source" / "critic" / "value_head.safetensors")
    assert not differ(head_state(given), saved) and given.scheme.stage1_done
    assert differ(head_state(trainer(kit, "fresh")), saved)
    del first


def check_aux_coef(kit) -> None:
    """`critic.aux_coef` scales the value loss that reaches the trunk: the trained model differs."""
    models = []
    for c in (0.0, 5.0):
        t = run(kit, f"c{c}", critic={"aux_coef": c}, train={"max_steps": 2}, optim_lr=1e-3)
        models.append({k: v.detach().clone() for k, v in t.model.state_dict().items()})
    assert differ(*models)


def check_value_lr(kit) -> None:
    """`critic.value_lr` is the stage-2 learning rate of the value head."""
    heads = [head_state(run(kit, f"lr{lr}", critic={"value_lr": lr}, train={"max_steps": 2})) for lr in (1e-6, 1e-2)]
    assert differ(*heads)


def value_lrs(kit, name: str, schedule: dict) -> list[float]:
    t = trainer(kit, name, critic={"value_schedule": schedule}, train={"max_steps": 8})
    return [t.scheme.scheduler.lr_lambdas[0](k) for k in range(8)]


def check_value_schedule_kind(kit) -> None:
    """`critic.value_schedule.kind` shapes the value head's learning rate over stage 2."""
    assert value_lrs(kit, "k1", {"kind": "constant"}) != value_lrs(kit, "k2", {"kind": "cosine"})


def check_value_schedule_warmup(kit) -> None:
    """`critic.value_schedule.warmup_steps` ramps the value head's learning rate up first."""
    assert value_lrs(kit, "k3", {"kind": "constant", "warmup_steps": 0})[0] == 1.0
    assert value_lrs(kit, "k4", {"kind": "constant", "warmup_steps": 4})[0] < 1.0


def check_value_schedule_min_lr_ratio(kit) -> None:
    """`critic.value_schedule.min_lr_ratio` is where the value head's decaying learning rate ends."""
    assert value_lrs(kit, "k5", {"kind": "linear", "min_lr_ratio": 0.0})[-1] < \
        value_lrs(kit, "k6", {"kind": "linear", "min_lr_ratio": 0.5})[-1]


# ---------------------------------------------------------------------------------------------- stage 1
def check_pretrain_max_steps(kit) -> None:
    """`pretrain.max_steps` bounds stage 1."""
    assert [stage1_steps(run(kit, f"m{n}", pretrain={"max_steps": n}, train={"max_steps": 1}))
            for n in (2, 6)] == [2, 6]


def check_pretrain_lr(kit) -> None:
    """`pretrain.lr` is stage 1's learning rate."""
    heads = [head_state(run(kit, f"p{lr}", pretrain={"lr": lr}, train={"max_steps": 1})) for lr in (1e-5, 1e-2)]
    assert differ(*heads)


def check_pretrain_weight_decay(kit) -> None:
    """`pretrain.weight_decay` shrinks stage 1's value-head weights."""
    heads = [head_state(run(kit, f"wd{wd}", pretrain={"weight_decay": wd, "lr": 1e-2}, train={"max_steps": 1}))
             for wd in (0.0, 10.0)]
    assert differ(*heads)


def check_pretrain_eval_every(kit) -> None:
    """`pretrain.eval_every` is how often stage 1 evaluates (and checkpoints) on held-out data."""
    counts = []
    for every in (1, 3):
        t = trainer(kit, f"ev{every}", pretrain={"max_steps": 6, "eval_every": every}, train={"max_steps": 1})
        logged = []

        def record(metrics, step, logged=logged):
            if "critic_pretrain/val_value_loss" in metrics:
                logged.append(step)

        kit.monkeypatch.setattr(t.tracker, "log_metrics", record)
        t.run()
        counts.append(len(logged))
    assert counts == [6, 2]


def early_stop_steps(kit, name: str, **pretrain) -> int:
    return stage1_steps(run(kit, name, pretrain={"max_steps": 12, "eval_every": 2, **pretrain},
                            train={"max_steps": 1}))


def check_pretrain_early_stopping(kit) -> None:
    """`pretrain.early_stopping`: none runs all steps; loss stops on a held-out plateau."""
    assert early_stop_steps(kit, "n", early_stopping="none") == 12
    assert early_stop_steps(kit, "l", early_stopping="loss", patience=1, min_delta=1e9) < 12


def check_pretrain_patience(kit) -> None:
    """`pretrain.patience` is how many evaluations without improvement stage 1 tolerates."""
    assert early_stop_steps(kit, "p1", early_stopping="loss", patience=1, min_delta=1e9) < \
        early_stop_steps(kit, "p3", early_stopping="loss", patience=3, min_delta=1e9)


def check_pretrain_min_delta(kit) -> None:
    """`pretrain.min_delta` is the improvement that counts: a huge one makes every evaluation a non-improvement."""
    assert early_stop_steps(kit, "d0", early_stopping="loss", patience=2, min_delta=0.0) > \
        early_stop_steps(kit, "d1", early_stopping="loss", patience=2, min_delta=1e9)


def check_pretrain_grad_cv_max(kit) -> None:
    """`pretrain.grad_cv_max`: with loss_and_gradient, stage 1 stops only once the gradient norm is that stable."""
    rule = {"early_stopping": "loss_and_gradient", "patience": 1, "min_delta": 1e9}
    assert early_stop_steps(kit, "cv0", grad_cv_max=1e-12, **rule) == 12
    assert early_stop_steps(kit, "cv1", grad_cv_max=1e9, **rule) < 12


CRITIC_KEY_CHECKS = {
    "recipe.critic.reward.kind": check_reward_kind,
    "recipe.critic.reward.check": check_reward_check,
    "recipe.critic.reward.timeout_s": check_reward_timeout_s,
    "recipe.critic.reward.model": check_reward_model,
    "recipe.critic.reward.positive_label": check_reward_positive_label,
    "recipe.critic.reward.batch_size": check_reward_batch_size,
    "recipe.critic.reward.function": check_reward_function,
    "recipe.critic.gamma": check_gamma,
    "recipe.critic.lam": check_lam,
    "recipe.critic.target": check_target,
    "recipe.critic.advantage": check_advantage,
    "recipe.critic.temperature": check_temperature,
    "recipe.critic.eps": check_critic_eps,
    "recipe.critic.w_max": check_critic_w_max,
    "recipe.critic.value_hidden": check_value_hidden,
    "recipe.critic.value_head_path": check_value_head_path,
    "recipe.critic.aux_coef": check_aux_coef,
    "recipe.critic.value_lr": check_value_lr,
    "recipe.critic.value_schedule.kind": check_value_schedule_kind,
    "recipe.critic.value_schedule.warmup_steps": check_value_schedule_warmup,
    "recipe.critic.value_schedule.min_lr_ratio": check_value_schedule_min_lr_ratio,
    "recipe.pretrain.max_steps": check_pretrain_max_steps,
    "recipe.pretrain.lr": check_pretrain_lr,
    "recipe.pretrain.weight_decay": check_pretrain_weight_decay,
    "recipe.pretrain.eval_every": check_pretrain_eval_every,
    "recipe.pretrain.early_stopping": check_pretrain_early_stopping,
    "recipe.pretrain.patience": check_pretrain_patience,
    "recipe.pretrain.min_delta": check_pretrain_min_delta,
    "recipe.pretrain.grad_cv_max": check_pretrain_grad_cv_max,
}
