# %% [markdown]
# # ranklens in a notebook
#
# Each cell runs as is in Jupyter (or `python docs/examples/quickstart.py`); the test suite runs this file.
# Everything loads from the embedded SmolLM2-135M and corpus: no hub, no run directory.

# %%
import tempfile

import torch

import ranklens
from ranklens.data.corpus import iter_documents

texts = [doc for doc, _ in zip(iter_documents("prose", seed=0), range(24), strict=False)]
acts = ranklens.capture("smollm2-135m", texts, ["L15.attn_out", "L15.mlp_out"], context_length=256)
print({site: tuple(x.shape) for site, x in acts.items()})

# %% [markdown]
# The effective rank of the attention output is lower than the MLP output's (the paper's Figure 2), even here.

# %%
for site, x in acts.items():
    record = ranklens.spectrum(x)
    print(f"{site}: erank {ranklens.effective_rank(x):.1f} of d = {x.shape[1]} "
          f"({record['erank_fraction']:.2f}), {record['frac_sv_above_1pct']:.0%} of singular values above 1%")

# %% [markdown]
# Two small SAEs on the attention output, the standard init against ASI, trained in memory and compared on
# held-out rows.

# %%
x = acts["L15.attn_out"]
train, held_out = x[: -512], x[-512:]
results = {}
for init in ("standard", "asi"):
    sae, metrics = ranklens.train_sae(train, eval_activations=held_out, k=16, expansion=2, init=init, d_init=64,
                                      batch_size=256, epochs=3, lr=1e-3, b_dec_init="mean", init_tokens=2048)
    results[init] = sae
    print(f"{init}: held-out FVU {metrics['fvu']:.3f}, L0 {metrics['l0']:.1f}, "
          f"{metrics['eval_dead']} features never firing on {metrics['eval_tokens']} held-out tokens")

# %% [markdown]
# Save one in the SAELens layout and load it back (the same call reads SAELens and LlamaScope directories).

# %%
from ranklens.dictionaries.saelens import save_saelens  # noqa: E402

with tempfile.TemporaryDirectory() as tmp:
    save_saelens(results["asi"], tmp + "/sae", model="smollm2-135m", site="L15.attn_out", context_length=256,
                 corpus="prose")
    again = ranklens.SparseAutoencoder.load(tmp + "/sae")
    assert torch.equal(again(held_out)[0], results["asi"](held_out)[0])
print("reloaded:", again)

# %% [markdown]
# A Lorsa replacing layer 15's attention, trained on the fly for a few batches.

# %%
lorsa, metrics = ranklens.train_lorsa("smollm2-135m", layer=15, heads=576, qk_groups=9, k=16, tokens=4096,
                                      batch_tokens=1024, context_length=256, lr=3e-3, output_bias="mean",
                                      init_tokens=1024)
print(f"Lorsa: {metrics['n_heads']} heads, {metrics['steps']} steps, last logged FVU {metrics['fvu']:.3f}")
