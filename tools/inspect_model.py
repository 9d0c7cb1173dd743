"""The debug probes of megatron_llm.LLM as pictures, for one text: an attention heatmap of a layer (per-head
mean), the cosine distance each layer puts between its input and output (token by layer), and a logit-lens
grid (the most likely next token at each position, read after each layer through the final norm and head).

    python tools/inspect_model.py --model checkpoints/tiny --text "def main():" --layer 1 --output inspect.png
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from plot_channels import check_picture, save_figure  # noqa: E402

from megatron_llm.errors import ArgumentParser, UsageError  # noqa: E402


def figure(llm, text: str, layer: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from megatron_llm.inference import probes

    tokens = llm.tensor(text)
    labels = [llm.tokenizer.decode([t]) for t in tokens[0].tolist()]
    layers = len(llm.model.layers)
    attention = probes.attention_weights(llm.model, tokens, layer).mean(0)  # [s, s]
    distance = torch.tensor([probes.cos_distance(llm.model, tokens, i) for i in range(layers)])  # [layers, s]
    lens = [[llm.tokenizer.decode([t]) for t in probes.lens_tokens(llm.model, tokens, i)] for i in range(layers)]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(6 + 0.9 * len(labels), 5))
    a.imshow(attention.float().numpy(), cmap="viridis")
    a.set_title(f"attention, layer {layer} (head mean)")
    b.imshow(distance.numpy(), cmap="magma", aspect="auto")
    b.set_title("cosine distance, input to output")
    b.set_ylabel("layer")
    c.imshow(torch.zeros_like(distance).numpy(), cmap="Greys", aspect="auto")  # a blank grid for the tokens
    for i, row in enumerate(lens):
        for p, token in enumerate(row):
            c.text(p, i, repr(token)[1:-1], ha="center", va="center", fontsize=7)
    c.set_title("logit lens: next token after each layer")
    for ax in (a, b, c):
        ax.set_xticks(range(len(labels)), [repr(t)[1:-1] for t in labels], rotation=90, fontsize=7)
    a.set_yticks(range(len(labels)), [repr(t)[1:-1] for t in labels], fontsize=7)
    for ax in (b, c):
        ax.set_yticks(range(layers))
    fig.tight_layout()
    return fig


def main(argv: list[str]) -> int:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--layer", type=int, default=0, help="the layer of the attention heatmap")
    p.add_argument("--output", default="inspect.png")
    p.add_argument("--tokenizer", default=None)
    a = p.parse_args(argv)
    try:
        from megatron_llm.inference.llm import LLM

        check_picture(a.output)
        llm = LLM.load(a.model, tokenizer=a.tokenizer)
        if not 0 <= a.layer < len(llm.model.layers):
            raise UsageError(f"--layer {a.layer} does not exist: the model has layers 0..{len(llm.model.layers) - 1}")
        save_figure(figure(llm, a.text, a.layer), a.output)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
