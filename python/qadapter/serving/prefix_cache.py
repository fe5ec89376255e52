"""Prefix caching for the serving engine: the KV cache of finished requests, reused by later prompts
that start the same way under the same policy (a shared system prompt; a chat's next turn, whose
prompt is the last one's conversation and answer and one more message).

A request's rows (its frozen row, then one per level of its policy) hold the KV of its prompt and of
the answer tokens fed back, at positions 0, 1, ...; the KV of position ``t`` depends on the tokens up
to ``t`` only, so the first ``n`` positions of a stored sequence serve any prompt whose first ``n``
tokens are the same. Entries are kept per policy (the LoRAs each level runs: an adapter loaded again
is another policy) and bounded by a budget of bytes, the least recently used dropped first.

Not for models whose attention slides over a window (Gemma-2, Mistral): a prompt read after a reused
prefix sits beside it with padding between, which moves the window.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from qadapter_kernels.config import check_integer

from ..library.packing import common_prefix


@dataclass
class Entry:
    """One stored sequence of a policy and its KV, per layer ``(keys, values)`` ``[rows, heads, n, d]``."""

    tokens: tuple[int, ...]
    kv: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def cost(self) -> int:
        """Bytes held."""
        return sum(t.numel() * t.element_size() for pair in self.kv for t in pair)


class PrefixCache:
    """Stored sequences by policy, within ``budget`` bytes (least recently used dropped first)."""

    def __init__(self, budget: int) -> None:
        self.budget, self.held = check_integer("the prefix cache budget", budget, least=1, note=" (bytes)"), 0
        self._entries: OrderedDict[tuple, Entry] = OrderedDict()  # (policy, tokens) -> entry, least recent first

    def __len__(self) -> int:
        return len(self._entries)

    def store(self, policy: tuple, tokens: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keeps ``tokens``' KV for ``policy``; a stored sequence it extends goes (the new one serves all
        that one served). One over the whole budget is not kept."""
        entry = Entry(tuple(tokens), kv)
        if not tokens or entry.cost > self.budget:
            return
        for key in [k for k in self._entries if k[0] == policy and entry.tokens[:len(k[1])] == k[1]]:
            self._drop(key)
        self._entries[(policy, entry.tokens)] = entry
        self.held += entry.cost
        while self.held > self.budget:
            self._drop(next(iter(self._entries)))

    def longest(self, policy: tuple, prompt: list[int]) -> tuple[int, Entry | None]:
        """The most positions of ``prompt`` a stored sequence of ``policy`` can give (at most all but its
        last token, whose read gives the next token's log-probs), and that entry; (0, None) if none."""
        best, found, prompt = 0, None, tuple(prompt)
        for owner, tokens in self._entries:
            if owner != policy:
                continue
            shared = common_prefix(tokens, prompt[:-1])
            if shared > best:
                best, found = shared, (owner, tokens)
        if found is None:
            return 0, None
        self._entries.move_to_end(found)
        return best, self._entries[found]

    def keep_policies(self, keep) -> None:
        """Drops the entries of every policy that ``keep(policy)`` refuses (an unloaded adapter's)."""
        for key in [k for k in self._entries if not keep(k[0])]:
            self._drop(key)

    def clear(self) -> None:
        """Drops every entry."""
        self._entries.clear()
        self.held = 0

    def _drop(self, key: tuple) -> None:
        self.held -= self._entries.pop(key).cost

