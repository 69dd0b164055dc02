"""Does a trained LoLCATs layer's linear mass depend on where the text sits, not on what it
holds? The same 2,048-token passkey prompt is run at position offsets (RoPE positions
shifted, content unchanged) and, per offset, the summed linear mass lam phi(q).z and exact
mass gamma sum e^(s - m) at the last query are printed beside the model's rank of the first
passkey digit.

    python scripts/linear_mass_by_position.py FINAL_DIR [--offsets 0 1024 2048] [--sparse-cache 64]

With feature maps on RoPE'd q and k (LoLCATs as published) the linear mass grows with the
offset although the text is the same: the maps never saw those rotation angles in training.
With `linear_rope=False` it does not move. Nothing is saved.
"""
import argparse

import torch
from transformers import AutoTokenizer

import linearize
import linearize.kernels.hybrid.sparse_cache as sparse_module
from linearize.assets import default_model_dir
from linearize.eval.passkey import make_passkey_sample


def record_masses(store: list):
    """Wrap the sparse path's combination so that each call records (exact, linear) mass
    [H] at its last query."""
    combine = sparse_module.combine_past_window

    def spy(o_win, lse, m, num, den, gamma, lam):
        store.append((gamma * torch.exp(lse - m))[0, -1].sum().item())
        store.append((lam * den)[0, -1].sum().item())
        return combine(o_win, lse, m, num, den, gamma, lam)

    sparse_module.combine_past_window = spy


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("final")
    p.add_argument("--offsets", type=int, nargs="+", default=[0, 1024, 2048])
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--sparse-cache", type=int, default=64)
    args = p.parse_args()
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    model = linearize.load(args.final, sparse_cache=args.sparse_cache).eval()
    layers = model.config.num_hidden_layers
    store: list = []
    record_masses(store)
    sample = make_passkey_sample(tok, args.length, 0.5, seed=0)
    space, digit = tok.encode(" " + sample.passkey, add_special_tokens=False)[:2]
    ids = torch.cat([sample.input_ids, torch.tensor([space])])[None]
    for offset in args.offsets:
        store.clear()
        with torch.no_grad():
            logits = model(ids, position_ids=torch.arange(ids.shape[1])[None] + offset).logits[0, -1]
        calls = len(store) // 2 // layers  # the sparse path runs one call per selection block
        last = [2 * ((layer + 1) * calls - 1) for layer in range(layers)]
        exact, lin = sum(store[i] for i in last), sum(store[i + 1] for i in last)
        rank = int((logits > logits[digit]).sum())
        print(f"offset {offset:5d}: linear mass {lin:7.2f}, exact mass {exact:6.2f} (sum over layers and heads), "
              f"linear share {lin / (lin + exact):.2f}, rank of the first digit {rank}", flush=True)


if __name__ == "__main__":
    main()
