"""Freezing phases: which parameters learn in a phase (Lightning's BaseFinetuning, as plain functions).

A phase trains the head, the head and the last N blocks (``top:N``), or everything; BatchNorms
whose parameters are frozen keep their running statistics."""

from __future__ import annotations

from torch import nn


def parameter_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters in network order, grouped by block; the last group is the head."""
    net = model.net
    if hasattr(net, "group_matcher"):
        from timm.models import group_parameters

        grouped = group_parameters(net, net.group_matcher(coarse=True))
        groups = [[f"net.{n}" for n in names] for _, names in sorted(grouped.items())]
        head_names = {f"net.{n}" for n, _ in net.get_classifier().named_parameters(prefix=_classifier_prefix(net))}
        body = [[n for n in g if n not in head_names] for g in groups]
        return [g for g in body if g] + [sorted(head_names)]
    blocks = [[f"net.blocks.{i}.{n}" for n, _ in block.named_parameters()] for i, block in enumerate(net.blocks)]
    return blocks + [[f"net.head.{n}" for n, _ in net.head.named_parameters()]]


def _classifier_prefix(net: nn.Module) -> str:
    classifier = net.get_classifier()
    for name, module in net.named_modules():
        if module is classifier:
            return name
    return ""


def apply_phase(model: nn.Module, trainable: str) -> list[str]:
    """Freeze all but what the phase trains; returns the names of trainable parameters."""
    groups = parameter_groups(model)
    if trainable == "all":
        chosen = [n for g in groups for n in g]
    else:
        count = 0 if trainable == "head" else int(trainable.split(":")[1])
        # The head is the last group; 'top:N' adds the N groups before it.
        chosen = [n for g in groups[max(len(groups) - 1 - count, 0) :] for n in g]
    chosen_set = set(chosen)
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen_set)
    return chosen


def freeze_batchnorm_stats(model: nn.Module) -> None:
    """BatchNorms whose parameters are frozen also keep their running statistics."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.eval()
