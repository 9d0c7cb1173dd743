# NVIDIA's PyTorch container already has CUDA, NCCL, Transformer Engine and apex; megatron_llm uses
# the last two only when importable. launch/ needs torchrun's --signals-to-handle and
# --shutdown-timeout (torch 2.12 or newer), hence a 2026 release. Build: docker build -t megatron_llm .
# Run: docker run --gpus all --ipc=host megatron_llm launch/torchrun.sh configs/tiny.yaml (README: Launching)
FROM nvcr.io/nvidia/pytorch:26.08-py3

WORKDIR /workspace/megatron_llm
# Dependencies first so that code edits do not invalidate the install layer. The container's torch
# satisfies our torch requirement, so pip keeps it.
COPY pyproject.toml README.md ./
COPY megatron_llm ./megatron_llm
RUN pip install --no-cache-dir -e .
COPY . .

CMD ["python", "train.py", "--help"]
