"""How far can training more of the backbone take ELPV? Centralised fine-tuning of EfficientNet-Lite0
from each cut (the last k stages and the head train, the rest is frozen), with batch norm after
the cut either frozen (edgesplit's choice: statistics folded in) or on batch statistics, plus a
few plain-FedAvg runs of the same model on the clients' split. An exploration to choose the cut,
sized for a GPU (about 12 minutes on one H100; days on 2 CPU cores).

    python -m simulations.cut_sweep pack                 # on this machine: ELPV (224 px JPEG) + weights
    python -m simulations.cut_sweep run --plan a > a.jsonl   # where a GPU is; also --plan b
    python -m simulations.cut_sweep table a.jsonl b.jsonl    # the BENCHMARKS.md section

``pack`` writes ``.gpu/`` (about 43 MB, git-ignored): the same split as an edgesplit run (seed
42, the server's held-out 25%, each training image's Dirichlet-0.3 client of 10). Images are
stored as 224 px greyscale JPEG (quality 95) so that they travel to a GPU machine; the sweep
uses random flips and quarter turns, and scores the images as they are and averaged over the
eight views. Single runs, one seed: about +-1.5 points of noise on 656 test images.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

PACK = Path(".gpu")


def pack(folder: Path = PACK) -> None:
    """The split and images an edgesplit ELPV run uses, and the Lite0 weights, in one folder."""
    from PIL import Image

    from common.backbones import load_backbone_weights
    from common.data import elpv_split, partition
    from common.kinds import ElpvTask, Partitioner

    folder.mkdir(exist_ok=True)
    rest, test = elpv_split(ElpvTask.FOUR_LEVEL, 0, 0.25, 42)
    blobs, labels, split = [], [], []
    for files, part in ((rest, 0), (test, 1)):
        for path, label in zip(files.paths, files.labels, strict=True):
            image = Image.open(path).convert("L").resize((224, 224), Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=95)
            blobs.append(np.frombuffer(buffer.getvalue(), np.uint8))
            labels.append(label)
            split.append(part)
    owner = np.full(len(rest), -1)
    index = {path: i for i, path in enumerate(rest.paths)}
    for client in range(10):
        for path in partition(rest, 10, client, Partitioner.DIRICHLET, 42, 0.3).paths:
            owner[index[path]] = client
    np.savez(
        folder / "elpv224.npz",
        data=np.concatenate(blobs),
        lengths=np.array([len(b) for b in blobs]),
        labels=np.array(labels),
        split=np.array(split),
        owner=owner,
    )
    torch.save(load_backbone_weights("efficientnet_lite0"), folder / "lite0.pt")


class PowerNorm(nn.Module):
    """edgesplit's head input normalisation (common/heads.py), repeated so that this file runs
    on a machine with torch and timm alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.sign(x) * torch.sqrt(torch.abs(x) + 1e-12)
        return nn.functional.normalize(x, dim=1) * (x.shape[1] ** 0.5)


class CutModel(nn.Module):
    """Lite0's nine stages (stem, seven block stages, head convolution); the first 9 - k frozen."""

    def __init__(self, state: dict[str, torch.Tensor], k: int, batch_statistics: bool) -> None:
        super().__init__()
        import timm

        model: Any = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
        model.load_state_dict(state)
        stages = [nn.Sequential(model.conv_stem, model.bn1), *model.blocks, nn.Sequential(model.conv_head, model.bn2)]
        self.prefix = nn.Sequential(*stages[: len(stages) - k])
        self.tail = nn.Sequential(*stages[len(stages) - k :])
        for param in self.prefix.parameters():
            param.requires_grad_(False)
        self.norm = PowerNorm()
        self.fc = nn.Linear(1280, 4)
        self.batch_statistics = batch_statistics

    def train(self, mode: bool = True) -> CutModel:
        super().train(mode)
        self.prefix.eval()
        if not self.batch_statistics:  # frozen statistics: what folding them into an affine does
            for module in self.tail.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = self.prefix(x)
        return self.fc(self.norm(self.tail(x).mean((2, 3))))


def dihedral(batch: torch.Tensor, k: int) -> torch.Tensor:
    turned = torch.rot90(batch, k % 4, (2, 3))
    return turned.flip(3) if k >= 4 else turned


def random_views(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    choice = torch.randint(0, 8, (len(batch),), generator=generator).to(batch.device)
    out = torch.empty_like(batch)
    for k in range(8):
        mask = choice == k
        if mask.any():
            out[mask] = dihedral(batch[mask], k)
    return out


class Sweep:
    def __init__(self, folder: Path, device: str) -> None:
        from PIL import Image

        self.device = device
        pack = np.load(folder / "elpv224.npz")
        offsets = np.concatenate([[0], np.cumsum(pack["lengths"])])
        images = np.stack(
            [
                np.asarray(Image.open(io.BytesIO(pack["data"][offsets[i] : offsets[i + 1]].tobytes())).convert("L"))
                for i in range(len(pack["lengths"]))
            ]
        )
        grey = torch.from_numpy(images).float().div(255).sub(0.5).div(0.5)  # Lite0's mean and std, 0.5
        self.x = grey[:, None].expand(-1, 3, -1, -1).contiguous().to(device)
        self.y = torch.from_numpy(pack["labels"]).long().to(device)
        self.train_index = np.where(pack["split"] == 0)[0]
        self.test_index = torch.from_numpy(np.where(pack["split"] == 1)[0]).to(device)
        self.owner = pack["owner"]
        self.state = torch.load(folder / "lite0.pt")

    def model(self, k: int, batch_statistics: bool) -> CutModel:
        return CutModel(self.state, k, batch_statistics).to(self.device).to(memory_format=torch.channels_last)

    def evaluate(self, net: nn.Module) -> tuple[float, float]:
        """Held-out accuracy of the images as they are, and averaged over the eight views."""
        net.eval()
        index, probabilities = self.test_index, []
        with torch.no_grad(), torch.autocast(self.device, torch.bfloat16):
            for k in range(8):
                probabilities.append(
                    torch.cat(
                        [
                            net(dihedral(self.x[index[s : s + 256]], k)).float().softmax(1)
                            for s in range(0, len(index), 256)
                        ]
                    )
                )
        stacked, truth = torch.stack(probabilities), self.y[index]
        plain = (stacked[0].argmax(1) == truth).float().mean().item()
        views = (stacked.mean(0).argmax(1) == truth).float().mean().item()
        return plain, views

    def fit(
        self,
        net: nn.Module,
        index: np.ndarray,
        epochs: int,
        lr: float,
        weight_decay: float,
        generator: torch.Generator,
        cosine: bool = True,
    ) -> None:
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
        steps, step = epochs * math.ceil(len(index) / 64), 0
        net.train()
        for _ in range(epochs):
            order = index[torch.randperm(len(index), generator=generator).numpy()]
            for start in range(0, len(order), 64):
                batch = torch.from_numpy(order[start : start + 64]).to(self.device)
                if cosine:
                    for group in optimizer.param_groups:
                        group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                with torch.autocast(self.device, torch.bfloat16):
                    logits = net(random_views(self.x[batch], generator))
                loss = nn.functional.cross_entropy(logits.float(), self.y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1

    def central(
        self, k: int, batch_statistics: bool = False, epochs: int = 20, lr: float = 0.01, wd: float = 1e-4
    ) -> dict[str, Any]:
        started = time.time()
        torch.manual_seed(0)
        net = self.model(k, batch_statistics)
        self.fit(net, self.train_index, epochs, lr, wd, torch.Generator().manual_seed(0))
        plain, views = self.evaluate(net)
        return {
            "mode": "central",
            "k": k,
            "bn_train": batch_statistics,
            "lr": lr,
            "epochs": epochs,
            "params": sum(p.numel() for p in net.parameters() if p.requires_grad),
            "acc": round(plain, 4),
            "acc_tta": round(views, 4),
            "s": round(time.time() - started, 1),
        }

    def federated(
        self, k: int, rounds: int = 30, local_epochs: int = 2, lr: float = 0.01, batch_statistics: bool = False
    ) -> dict[str, Any]:
        """FedAvg of the trainable part over the 10 Dirichlet clients (BN statistics, if used,
        stay in the one shared module: a rough stand-in for local statistics)."""
        started = time.time()
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        net = self.model(k, batch_statistics)
        trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
        global_state = {n: p.detach().clone() for n, p in trainable.items()}
        history = []
        for server_round in range(1, rounds + 1):
            round_lr = lr * 0.5 * (1 + math.cos(math.pi * (server_round - 1) / rounds))
            sums = {n: torch.zeros_like(v) for n, v in global_state.items()}
            total = 0
            for client in range(10):
                index = self.train_index[self.owner[self.train_index] == client]
                with torch.no_grad():
                    for n, p in trainable.items():
                        p.copy_(global_state[n])
                self.fit(net, index, local_epochs, round_lr, 1e-4, generator, cosine=False)
                with torch.no_grad():
                    for n, p in trainable.items():
                        sums[n] += p.detach() * len(index)
                total += len(index)
            global_state = {n: v / total for n, v in sums.items()}
            with torch.no_grad():
                for n, p in trainable.items():
                    p.copy_(global_state[n])
            if server_round % 5 == 0 or server_round == rounds:
                history.append((server_round, *(round(a, 4) for a in self.evaluate(net))))
        return {
            "mode": "fed",
            "k": k,
            "rounds": rounds,
            "E": local_epochs,
            "lr": lr,
            "hist": history,
            "s": round(time.time() - started, 1),
        }


PLANS: dict[str, Callable[[Sweep], list[Callable[[], dict[str, Any]]]]] = {
    "a": lambda s: [
        lambda: s.central(0, lr=0.03, wd=1e-3),
        *(lambda k=k: s.central(k) for k in (1, 2, 3, 4, 5, 6, 9)),
        lambda: s.central(9, batch_statistics=True),
        lambda: s.federated(0, lr=0.03),
        lambda: s.federated(4),
        lambda: s.federated(6),
        lambda: s.central(4, lr=0.03),
    ],
    "b": lambda s: [
        lambda: s.central(4, batch_statistics=True),
        lambda: s.central(6, batch_statistics=True),
        lambda: s.central(4, lr=0.001),
        lambda: s.central(9, batch_statistics=True, epochs=40, lr=0.02),
        lambda: s.central(3, batch_statistics=True),
        lambda: s.federated(4, rounds=15, batch_statistics=True),
    ],
}


def write_table(results: list[dict[str, Any]]) -> None:
    from deploy.local_simulation import PROJECT_ROOT
    from simulations.benchmark import markdown_table, update_section

    rows = []
    for r in results:
        if r["mode"] == "central":
            bn = "batch statistics" if r["bn_train"] else "frozen"
            rows.append(
                (
                    f"central, k={r['k']}",
                    bn,
                    f"{r['lr']}, {r['epochs']} epochs",
                    f"{r['params']:,}",
                    f"{r['acc']:.4f}",
                    f"{r['acc_tta']:.4f}",
                )
            )
        else:
            last = r["hist"][-1]
            rows.append(
                (
                    f"FedAvg, k={r['k']}",
                    "batch statistics" if r["bn_train"] else "frozen",
                    f"{r['lr']}, {r['rounds']} rounds x {r['E']}",
                    f"{r['params']:,}",
                    f"{last[1]:.4f}",
                    f"{last[2]:.4f}",
                )
            )
    columns = (
        "run (k: stages trained)",
        "batch norm after the cut",
        "lr, length",
        "trained parameters",
        "accuracy",
        "averaged over 8 views",
    )
    update_section(
        PROJECT_ROOT / "BENCHMARKS.md",
        "How far training more of the backbone goes on ELPV (exploration, GPU)",
        "Command: `python -m simulations.cut_sweep pack`, then `run --plan a` and `run --plan b` on one H100\n"
        "(about 12 minutes together), then `table` (raw lines: docs/cut_sweep.jsonl). EfficientNet-Lite0,\n"
        "224 px, the run's split (seed 42, held-out 25%), SGD momentum 0.9, batch 64, random flips and\n"
        "quarter turns, one seed each (about +-1.5 points of noise). k=0 is edgesplit's head only, k=1 its\n"
        "`cut=1`, k=9 the whole network. Frozen statistics collapse to the majority class (0.5747) from k=3\n"
        "on at lr 0.01; k=4 trains at lr 0.001. The FedAvg rows: the 10 Dirichlet clients, the last round.\n\n"
        f"{markdown_table(rows, columns)}\n",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("pack", "run", "table"))
    parser.add_argument("results", nargs="*", type=Path, help="table: the JSON lines that run printed")
    parser.add_argument("--plan", choices=sorted(PLANS), default="a")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", type=float, default=470.0, help="seconds after which no new experiment starts")
    args = parser.parse_args(argv)
    if args.step == "pack":
        pack()
        return 0
    if args.step == "table":
        write_table(
            [json.loads(line) for path in args.results for line in path.read_text().splitlines() if line[:1] == "{"]
        )
        return 0
    started = time.time()
    torch.backends.cudnn.benchmark = True
    sweep = Sweep(PACK, args.device)
    for experiment in PLANS[args.plan](sweep):
        if time.time() - started > args.budget:
            print("time budget reached")
            break
        print(json.dumps(experiment()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
