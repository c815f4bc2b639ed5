"""Compact students against compressed models on digits (the built-in digits_resnet teacher and its data).

Part 1, cheap candidates. The mobilenet space's supernet is trained once (cached; its one-off training time
is printed) and a few students of the space (the smallest, random ones, the largest) are judged each way:
  inherited     supernet weights + BatchNorm recalibration, no training step
  inherited+N   the same, then N distillation steps (lr 0.01, as the search's fine-tune)
  scratch+N     fresh weights, N distillation steps (lr 0.05)
  scratch+L     fresh weights, L distillation steps (lr 0.05): what a search would pay without a supernet
All four use the same distillation loop (teacher outputs computed once per image, BN recalibrated after),
so the times compare the training itself. Accuracy is top-1 on the 540 validation digits.

Part 2, one front. Two searches with the same trials and fine-tuning steps per candidate (objectives accuracy
and estimated latency, no budget): students (the mobilenet space) and compressed models (the `all` space's
compression techniques). From each, the candidate with the lowest estimated latency within 1 point of the
teacher's accuracy, rebuilt from its policy and re-measured: accuracy (Result.model re-prepares it as the
search did), size (cost model and torch.save), MACs, estimated and measured host latency (median of
interleaved rounds, one thread), and the search's wall time. Then the union of both studies' fronts:
which kind wins where.

    .venv/bin/python scripts/bench_students.py [--students 4] [--steps 50] [--long 300] [--trials 24]
                                               [--search-steps 40]
"""
from __future__ import annotations

import argparse
import io
import random
import time
import warnings

import pandas as pd
import torch

import autocompress as ac
from autocompress import supernet
from autocompress.cost.measure import measure_latency_ms
from autocompress.data import digits_loaders
from autocompress.evaluate import Evaluator, TeacherOutputs, accuracy, distill_loss
from autocompress.models import digits_resnet
from autocompress.result import pareto_front
from autocompress.space import SearchSpace
from autocompress.students.bank import inherit, load
from autocompress.students.build import build

FMT = {"float_format": lambda v: f"{v:.4g}", "index": False}



def count_params(model) -> int:
    """Parameters counted independently of the cost model: distinct storages among every use of a tensor."""
    return sum(p.numel() for p in {p.data_ptr(): p for _, p in model.named_parameters(remove_duplicate=False)}.values())

def kd_train(model, train, teacher, steps: int, lr: float) -> float:
    """Distillation steps (SGD, Nesterov, cosine) with cached teacher outputs; returns the seconds taken."""
    start = time.perf_counter()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=4e-5)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    model.train()
    for x, y, target in TeacherOutputs(teacher).batches(train, steps):
        opt.zero_grad()
        distill_loss(model(x), target, y, 4.0, 0.7).backward()
        opt.step()
        schedule.step()
    return time.perf_counter() - start


def judged(model, judge: Evaluator, val) -> float:
    judge.calibrate(model)
    return accuracy(model, val)


def cheap_candidates(teacher, x, train, val, args) -> pd.DataFrame:
    bound = SearchSpace.load("mobilenet").bind(ac.analyze(teacher, x))
    start = time.perf_counter()
    key = supernet.prepare(bound, teacher, x, train)
    bank = load(key)
    steps = bound.space.techniques["student"]["supernet_steps"]
    print(f"mobilenet supernet {key}: {steps} sandwich steps, trained once in {bank['seconds']:.0f} s "
          f"(this run: {time.perf_counter() - start:.0f} s; cached)\n")
    sampler, rng = supernet.Sampler(bound), random.Random(0)
    sections = [sampler.uniform(0.0)] + [sampler.random(rng) for _ in range(args.students - 2)] + [sampler.uniform(1.0)]
    judge = Evaluator(train, val)
    rows = []
    for i, section in enumerate(sections):
        torch.manual_seed(i)
        est = ac.estimate(build(section, x.shape, 10), x)
        row = {"student": ["smallest", *[f"random {j}" for j in range(1, args.students - 1)], "largest"][i],
               "MACs (M)": est.macs / 1e6, "params (k)": est.params / 1e3}
        start = time.perf_counter()
        inherited = inherit(build(section, x.shape, 10), bank)
        row["inherited acc"] = judged(inherited, judge, val)
        row["inherited s"] = time.perf_counter() - start
        seconds = kd_train(inherited, train, teacher, args.steps, 0.01)
        row[f"inherited+{args.steps} acc"] = judged(inherited, judge, val)
        row[f"inherited+{args.steps} s"] = row["inherited s"] + seconds
        for steps in (args.steps, args.long):
            fresh = build(section, x.shape, 10)
            seconds = kd_train(fresh, train, teacher, steps, 0.05)
            row[f"scratch+{steps} acc"] = judged(fresh, judge, val)
            row[f"scratch+{steps} s"] = seconds
        rows.append(row)
        print(pd.DataFrame([row]).to_string(**FMT), flush=True)
    return pd.DataFrame(rows)


def toolbox_space() -> SearchSpace:
    """The `all` space's compression techniques without its student section."""
    everything = SearchSpace.load("all")
    return SearchSpace("toolbox", {t: c for t, c in everything.techniques.items() if t != "student"},
                       "the all space's compression techniques")


def search(teacher, x, data, space, args) -> tuple[ac.Result, float]:
    start = time.perf_counter()
    result = ac.compress(teacher, x, data=data, space=space, trials=args.trials, finetune_steps=args.search_steps,
                         seed=0, progress=False)
    return result, (time.perf_counter() - start) / 60


def best_within_a_point(result: ac.Result, teacher_acc: float):
    ok = result.trials[result.trials["feasible"] & result.trials["accuracy"].notna()]
    close = ok[ok["accuracy"] >= teacher_acc - 0.01]
    return close["latency_ms"].idxmin() if len(close) else None


def saved_kb(model) -> float:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return len(buf.getvalue()) / 1024


def interleaved_ms(models: dict, x, rounds: int = 5) -> dict:
    """Median host latency per model, measured in interleaved rounds so load hits them alike."""
    times = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            times[k].append(measure_latency_ms(m, x))
    return {k: float(pd.Series(v).median()) for k, v in times.items()}


def one_front(teacher, x, data, teacher_acc: float, args) -> None:
    searches = {"student (mobilenet)": "mobilenet", "compressed (all's toolbox)": toolbox_space()}
    rows, models, fronts = [], {"teacher": teacher}, []
    for label, space in searches.items():
        result, minutes = search(teacher, x, data, space, args)
        fronts.append(result.trials.assign(search=label))
        number = best_within_a_point(result, teacher_acc)
        row = {"search": label, "trials": args.trials, "wall min": minutes, "trial": number}
        if number is not None:
            model = result.model(number)
            est = ac.estimate(model, x)
            again = accuracy(model, data[1])
            assert abs(again - result.trials.loc[number, "accuracy"]) < 1e-9, (label, number, again)
            assert est.params == count_params(model) == result.trials.loc[number, "params"]
            row.update({"accuracy": again, "size KB": est.size_kb, "saved KB": saved_kb(model), "MACs (M)": est.macs / 1e6,
                        "est ms": est.latency_ms})
            models[label] = model
        else:
            row["best accuracy"] = result.trials["accuracy"].max()
        rows.append(row)
        print(pd.DataFrame([row]).to_string(**FMT), flush=True)
    measured = interleaved_ms(models, x)
    for row in rows:
        row["measured ms"] = measured.get(row["search"])
    base = ac.estimate(teacher, x)
    print(f"\nLowest-latency candidate within 1 point of the teacher (accuracy {teacher_acc:.4f}, "
          f"{base.size_kb:.0f} KB, {base.macs / 1e6:.1f} M MACs, estimated {base.latency_ms:.2f} ms, measured "
          f"{measured['teacher']:.2f} ms), {args.search_steps} fine-tuning steps per candidate:")
    print(pd.DataFrame(rows).to_string(**FMT))
    both = pd.concat(fronts)
    front = pareto_front(both, ("accuracy", "latency_ms"))
    print("\nThe two studies' trials on one front (accuracy vs estimated latency), fastest first:")
    print(front[["search", "origin", "accuracy", "latency_ms", "size_kb", "macs"]].sort_values("latency_ms")
          .to_string(float_format=lambda v: f"{v:.4g}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", type=int, default=4, help="students judged in part 1 (>= 2)")
    parser.add_argument("--steps", type=int, default=50, help="short distillation budget of part 1")
    parser.add_argument("--long", type=int, default=300, help="long from-scratch budget of part 1")
    parser.add_argument("--trials", type=int, default=24, help="trials per search in part 2 (0: skip part 2)")
    parser.add_argument("--search-steps", type=int, default=40, help="fine-tuning steps per candidate in part 2")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    teacher, x = digits_resnet(), torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    train, val, _ = digits_loaders()
    teacher_acc = accuracy(teacher, val)
    print(f"teacher digits_resnet: accuracy {teacher_acc:.4f}\n")
    table = cheap_candidates(teacher, x, train, val, args)
    print(f"\nInherited-weight students against the same students trained from scratch (seconds of training on "
          f"{torch.get_num_threads()} thread(s); the supernet's one-off time is above):")
    print(table.to_string(**FMT))
    if args.trials:
        print()
        one_front(teacher, x, (train, val), teacher_acc, args)


if __name__ == "__main__":
    main()
