"""A CPU stand-in for an SGLang server: the same native HTTP API, served by the Hugging Face model.

SGLang cannot run without CUDA, so the rollout client, the launcher and the weight sync are tested
(and the tiny demo runs) against this server::

    python -m megatron_gopd.cpu_server --model-path HF_DIR [--port 30000]

* :mod:`~megatron_gopd.cpu_server.server`: the HTTP endpoints, request checks, the command line.
* :mod:`~megatron_gopd.cpu_server.weights`: the weight and memory endpoints (SGLang's admin API).
* :mod:`~megatron_gopd.cpu_server.replies`: answers in SGLang's error shapes.
* :mod:`~megatron_gopd.cpu_server.engine`: the model side (the scheduler, sampling, prefill
  scoring, weight updates, the weight-update process group).
* :mod:`~megatron_gopd.cpu_server.batch`: what the scheduler runs (rows, KV slots, the row-wise
  attention, batch-invariant linear layers).

It sits beside the client (:mod:`megatron_gopd.rollout`) and uses its protocol and the weight-sync
wire format (:mod:`megatron_gopd.sync`); nothing in those imports it.
"""
