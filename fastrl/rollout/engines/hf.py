"""Generation with a transformers causal LM: the training model itself.

The engine holds a reference to the trainer's module, so its weights are the trainer's weights:
`sync_weights` has nothing to copy. Prompts are left-padded into one batch per call.
"""

from __future__ import annotations

from typing import Any

import torch

from fastrl.rollout.types import GenOutput, Sampling


def _top_p(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """Log-probabilities with the tail outside the nucleus `top_p` set to -inf."""
    if top_p >= 1.0:
        return logp
    sorted_lp, order = logp.sort(dim=-1, descending=True)  # [b, V]
    cum = sorted_lp.exp().cumsum(-1)
    drop = cum - sorted_lp.exp() > top_p  # keep the token that crosses the threshold
    sorted_lp = sorted_lp.masked_fill(drop, float("-inf"))
    return torch.full_like(logp, float("-inf")).scatter(-1, order, sorted_lp)


class HFEngine:
    """Batched KV-cached decoding on a transformers causal LM.

    Multi-turn episodes resend their whole context every turn. The engine keeps each request's
    keys and values from its previous call and prefills only the new suffix (the last sampled
    token and the observation), as a prefix cache would. Entries of requests absent from a call
    are dropped (their episodes ended), and `sync_weights` drops all of them.
    """

    def __init__(self, model: torch.nn.Module, pad_token_id: int, *, max_batch: int = 256):
        self.model = model
        self.pad_token_id = pad_token_id
        self.max_batch = max_batch
        # request id -> (token ids covered, per-layer (keys [h, L, d], values [h, L, d]))
        self._prefix: dict[str, tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]] = {}

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        sampling: Sampling,
        request_ids: list[str] | None = None,
    ) -> list[GenOutput]:
        rids = request_ids if request_ids is not None else [None] * len(prompts)
        live = {r for r in rids if r is not None}
        self._prefix = {r: v for r, v in self._prefix.items() if r in live}
        reuse = [self._cached_len(r, p) for r, p in zip(rids, prompts)]
        # Sorting by new-token count keeps padding small inside each chunk.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) - reuse[i])
        by_index: dict[int, GenOutput] = {}
        for start in range(0, len(order), self.max_batch):
            chunk = order[start : start + self.max_batch]
            outs = self._generate_batch(
                [prompts[i] for i in chunk],
                [rids[i] for i in chunk],
                [reuse[i] for i in chunk],
                sampling,
            )
            for i, out in zip(chunk, outs):
                by_index[i] = out
        return [by_index[i] for i in range(len(prompts))]

    def _cached_len(self, rid: str | None, prompt: list[int]) -> int:
        entry = self._prefix.get(rid) if rid is not None else None
        if entry is None:
            return 0
        ids = entry[0]
        # At least one new token must be fed to get the next-token distribution.
        if len(ids) >= len(prompt) or prompt[: len(ids)] != ids:
            return 0
        return len(ids)

    def _generate_batch(
        self,
        prompts: list[list[int]],
        rids: list[str | None],
        reuse: list[int],
        sampling: Sampling,
    ) -> list[GenOutput]:
        """Decode one batch; finished rows leave the batch at once, so one long row does not keep
        the whole batch decoding."""
        from transformers import DynamicCache

        device = next(self.model.parameters()).device
        B = len(prompts)
        past_w = max(reuse)
        new_w = max(len(p) - c for p, c in zip(prompts, reuse))
        # Row layout: [pad][cached prefix][pad][new tokens]; pads are masked out.
        input_ids = torch.full((B, new_w), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, past_w + new_w), dtype=torch.long)
        positions = torch.zeros((B, new_w), dtype=torch.long)
        for row, (ids, c) in enumerate(zip(prompts, reuse)):
            n = len(ids) - c
            input_ids[row, new_w - n :] = torch.tensor(ids[c:])
            positions[row, new_w - n :] = torch.arange(c, len(ids))
            attention_mask[row, past_w - c : past_w] = 1
            attention_mask[row, past_w + new_w - n :] = 1
        cache = DynamicCache()
        if past_w:
            layers = []
            template = next(e for r, e in ((r, self._prefix.get(r)) for r in rids) if e)[1]
            for layer, (k0, v0) in enumerate(template):
                keys = k0.new_zeros((B, k0.shape[0], past_w, k0.shape[2]))
                values = v0.new_zeros((B, v0.shape[0], past_w, v0.shape[2]))
                for row, (rid, c) in enumerate(zip(rids, reuse)):
                    if c:
                        k, v = self._prefix[rid][1][layer]
                        keys[row, :, past_w - c :] = k
                        values[row, :, past_w - c :] = v
                layers.append((keys, values))
            cache = DynamicCache(ddp_cache_data=layers)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        step_ids, step_pos = input_ids, positions.to(device)
        greedy = sampling.temperature <= 0
        scale = 1.0 if greedy else 1.0 / sampling.temperature
        tokens: list[list[int]] = [[] for _ in range(B)]
        logprobs: list[list[float]] = [[] for _ in range(B)]
        finished = [False] * B
        rows = list(range(B))  # original row of each live batch entry
        was_training = self.model.training
        self.model.eval()
        try:
            for step in range(sampling.max_tokens):
                out = self.model(
                    input_ids=step_ids,
                    attention_mask=attention_mask,
                    position_ids=step_pos,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                logp = torch.log_softmax(out.logits[:, -1].float() * scale, dim=-1)  # [b, V]
                if greedy:
                    nxt = logp.argmax(-1)  # [b]
                else:
                    nxt = torch.multinomial(_top_p(logp, sampling.top_p).exp(), 1)[:, 0]  # [b]
                chosen = logp.gather(-1, nxt[:, None])[:, 0]  # [b]
                keep = []
                last = step == sampling.max_tokens - 1
                for j, (r, tok, lp) in enumerate(zip(rows, nxt.tolist(), chosen.tolist())):
                    tokens[r].append(tok)
                    logprobs[r].append(lp)
                    finished[r] = tok == sampling.stop_token_id
                    if finished[r] or last:
                        self._remember(
                            rids[r], prompts[r] + tokens[r][:-1], cache, attention_mask, j
                        )
                    else:
                        keep.append(j)
                if not keep:
                    break
                step_ids = nxt[:, None]  # [b, 1]
                step_pos = step_pos[:, -1:] + 1  # [b, 1]
                attention_mask = torch.cat(
                    [attention_mask, attention_mask.new_ones((len(rows), 1))], dim=1
                )
                if len(keep) < len(rows):
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    rows = [rows[j] for j in keep]
                    step_ids, step_pos = step_ids[index], step_pos[index]
                    attention_mask = attention_mask[index]
        finally:
            self.model.train(was_training)
        return [GenOutput(tokens[r], logprobs[r], finished[r]) for r in range(B)]

    def _remember(self, rid, ids, cache, attention_mask, j) -> None:
        """Keep row j's keys and values (of the tokens fed so far, `ids`) for the next call."""
        if rid is None:
            return
        valid = attention_mask[j].bool()  # [L]
        layers = [
            (layer.keys[j][:, valid].clone(), layer.values[j][:, valid].clone())
            for layer in cache.layers
        ]
        if layers[0][0].shape[1] == len(ids):
            self._prefix[rid] = (ids, layers)

    def sync_weights(self, named_tensors: Any = None) -> None:
        """Generation runs on the trainer's own parameters: nothing to copy, but cached keys and
        values were computed with the old weights."""
        self._prefix.clear()

    def sleep(self) -> None:
        """Release cached keys and values between rollouts."""
        self._prefix.clear()

    def wake(self) -> None:
        """Nothing to restore: the next call prefills from scratch."""
