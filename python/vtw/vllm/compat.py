"""Every vLLM symbol vtw.vllm uses, with the shape vtw expects, per supported vLLM version: one
table, checked at plugin registration (a vLLM whose internals moved is refused when a model asks
for withdrawal, see _version.check) and by the tests of each CI set (on vLLM 0.34, which cannot
run an engine here, this check and the plugin's registration are what is tested).

An entry: (module, attribute path, parameter names the callable must take in this order (a
prefix of its signature; None: only that it exists), the versions it applies to ("all", or a
version string)). Fields of a dataclass are checked as its ``__init__`` parameters by name.
"""

from __future__ import annotations

import importlib
import inspect

ALL = "all"
V032, V034 = "0.32", "0.34"

API: tuple = (
    # config hook (_config.install)
    ("vllm.config", "VllmConfig.try_verify_and_update_config", ("self",), ALL),
    # families whose video frames carry an id the config does not name: videos refused (_config)
    ("vllm.config.multimodal", "MultiModalConfig.get_limit_per_prompt", ("self", "modality"), ALL),
    # shared withdrawal core (_runner)
    ("vllm.forward_context", "get_forward_context", (), ALL),
    ("vllm.forward_context", "ForwardContext.attn_metadata", None, ALL),
    ("vllm.forward_context", "ForwardContext.slot_mapping", None, ALL),
    # compilation kept on (_runner._model_forward, _config.verify): the per-forward eager switch,
    # the decorator's flag, piecewise CUDA graphs on platforms that capture them
    ("vllm.forward_context", "ForwardContext.skip_compiled", None, ALL),
    ("vllm.compilation.decorators", "support_torch_compile", None, ALL),
    ("vllm.config", "CUDAGraphMode.PIECEWISE", None, ALL),
    ("vllm.config", "CUDAGraphMode.has_full_cudagraphs", ("self",), ALL),
    ("vllm.platforms", "current_platform.support_static_graph_mode", (), ALL),
    ("vllm.v1.attention.backend", "CommonAttentionMetadata",
     {"query_start_loc", "query_start_loc_cpu", "seq_lens", "seq_lens_cpu_upper_bound", "num_reqs",
      "num_actual_tokens", "max_query_len", "max_seq_len", "block_table_tensor", "slot_mapping", "causal",
      "is_prefilling"}, ALL),
    ("vllm.v1.kv_cache_interface", "FullAttentionSpec", None, ALL),
    # a deep sliding-window layer whose window cannot bind joins text_only (_runner._text_only_specs)
    ("vllm.v1.kv_cache_interface", "SlidingWindowSpec", {"sliding_window", "block_size"}, ALL),
    ("vllm.v1.kv_cache_interface", "AttentionSpec", {"block_size", "num_kv_heads", "head_size", "dtype"}, ALL),
    # deep sliding-window layers whose window binds (_window): vLLM's attention ops call the layer's
    # impl (replaced by WindowImpl) through these two custom ops, with the KV update separate
    ("vllm.model_executor.layers.attention.attention", "unified_kv_cache_update", ("key", "value", "layer_name"), ALL),
    ("vllm.model_executor.layers.attention.attention", "unified_attention_with_output",
     ("query", "key", "value", "output", "layer_name"), ALL),
    ("vllm.v1.attention.backend", "AttentionBackend.forward_includes_kv_cache_update", None, ALL),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl.do_kv_cache_update",
     ("self", "layer", "key", "value", "kv_cache", "slot_mapping"), ALL),
    ("vllm.v1.attention.backends.triton_attn", "TritonAttentionImpl.do_kv_cache_update",
     ("self", "layer", "key", "value", "kv_cache", "slot_mapping"), ALL),
    ("vllm.v1.worker.utils", "AttentionGroup.build_metadata", ("self", "common_attn_metadata", "ubatch_idx"), ALL),
    ("vllm.v1.worker.utils", "AttentionGroup.layer_names", None, ALL),
    ("vllm.v1.worker.utils", "AttentionGroup.kv_cache_spec", None, ALL),
    # the worker-side check (runners.install)
    ("vllm.v1.worker.gpu_worker", "Worker.load_model", ("self",), ALL),
    # Model Runner V2 (runners.mrv2)
    ("vllm.v1.worker.gpu.model_runner", "init_model_state", ("vllm_config", "model", "encoder_cache", "device"), ALL),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.load_model", ("self",), ALL),
    ("vllm.v1.worker.gpu.model_states", "resolve_model_state_cls", ("vllm_config", "model"), ALL),
    ("vllm.v1.worker.gpu.model_states.default", "DefaultModelState.__init__",
     ("self", "vllm_config", "model", "encoder_cache", "device"), ALL),
    ("vllm.v1.worker.gpu.model_states.default", "DefaultModelState.add_request",
     ("self", "req_index", "new_req_data"), ALL),
    ("vllm.v1.worker.gpu.model_states.default", "DefaultModelState.remove_request", ("self", "req_id"), ALL),
    ("vllm.v1.worker.gpu.model_states.default", "DefaultModelState.prepare_attn",
     ("self", "input_batch", "cudagraph_mode", "block_tables", "slot_mappings", "attn_groups", "kv_cache_config",
      "for_capture", "ubatch_idx"), ALL),
    ("vllm.v1.worker.gpu.input_batch", "InputBatch",
     {"req_ids", "num_reqs", "idx_mapping", "num_scheduled_tokens", "num_tokens", "query_start_loc",
      "num_computed_tokens_np", "is_prefilling_np", "input_ids"}, ALL),
    ("vllm.v1.core.sched.output", "NewRequestData", {"req_id", "prefill_token_ids"}, ALL),
    # V1 runner (runners.v1): vLLM 0.32 only (removed in 0.34)
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._build_attention_metadata", ("self",), V032),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.execute_model", ("self",), V032),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.load_model", ("self",), V032),
    ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner.load_model", ("self",), V032),
    # Qwen3-VL / Qwen3-VL-MoE (_config.FAMILIES): the language model adds DeepStack buffer i to the
    # hidden states after the layer of loop index i, for the whole batch; the outer model keeps the
    # per-level buffers (instance attributes deepstack_input_embeds, deepstack_input_embeds_num_tokens,
    # which _runner._skip_deepstack zeroes from level K on), filled by embed_input_ids and cleared after
    # the forward by these methods. Checked where the engines run (tests/test_vllm_qwen3vl.py)
    ("vllm.model_executor.models.qwen3_vl", "Qwen3LLMModel.forward",
     ("self", "input_ids", "positions", "intermediate_tensors", "inputs_embeds", "deepstack_input_embeds"), V032),
    ("vllm.model_executor.models.qwen3_vl_moe", "Qwen3MoeLLMModel.forward",
     ("self", "input_ids", "positions", "intermediate_tensors", "inputs_embeds", "deepstack_input_embeds"), V032),
    ("vllm.model_executor.models.qwen3_vl", "Qwen3VLForConditionalGeneration._set_deepstack_input_embeds",
     ("self", "deepstack_input_embeds"), V032),
    ("vllm.model_executor.models.qwen3_vl", "Qwen3VLForConditionalGeneration._clear_deepstack_input_embeds",
     ("self", "num_tokens"), V032),
    # text-only KV groups (_text_only)
    ("vllm.utils.math_utils", "cdiv", ("a", "b"), ALL),
    ("vllm.v1.kv_cache_spec_registry", "KVCacheSpecRegistry.register",
     ("kvcache_spec_cls", "manager_class", "uniform_type_base_spec"), ALL),
    ("vllm.v1.kv_cache_spec_registry", "KVCacheSpecRegistry._ensure_registered", (), ALL),
    ("vllm.v1.core.single_type_kv_cache_manager", "FullAttentionManager.get_num_blocks_to_allocate",
     ("self", "request_id", "num_tokens", "new_computed_blocks", "total_computed_tokens",
      "num_local_computed_tokens", "num_tokens_main_model"), ALL),
    ("vllm.v1.core.single_type_kv_cache_manager", "FullAttentionManager.allocate_new_blocks",
     ("self", "request_id", "num_tokens", "num_tokens_main_model"), ALL),
    ("vllm.v1.core.single_type_kv_cache_manager", "FullAttentionManager.add_local_computed_blocks",
     ("self", "request_id", "new_computed_blocks", "num_local_computed_tokens", "num_external_computed_tokens"), ALL),
    ("vllm.v1.core.single_type_kv_cache_manager", "FullAttentionManager.cache_blocks",
     ("self", "request", "num_tokens"), ALL),
    ("vllm.v1.core.single_type_kv_cache_manager", "FullAttentionManager.find_longest_cache_hit",
     ("block_hashes", "max_length", "kv_cache_group_ids", "block_pool", "kv_cache_spec"), ALL),
    ("vllm.v1.core.sched.scheduler", "Scheduler.add_request", ("self", "request"), ALL),
    ("vllm.v1.core.sched.scheduler", "Scheduler._free_blocks", ("self", "request"), ALL),
    # prefix-cache hits capped at the first visual token, start-up capacity log (_prefix, _text_only)
    ("vllm.v1.core.sched.scheduler", "Scheduler.__init__", ("self", "vllm_config", "kv_cache_config"), ALL),
    ("vllm.v1.core.kv_cache_manager", "KVCacheManager.get_computed_blocks", ("self", "request"), ALL),
    ("vllm.v1.core.kv_cache_coordinator", "HybridKVCacheCoordinator.find_longest_cache_hit",
     ("self", "block_hashes", "max_cache_hit_length"), ALL),
    ("vllm.v1.core.kv_cache_coordinator", "UnitaryKVCacheCoordinator.find_longest_cache_hit",
     ("self", "block_hashes", "max_cache_hit_length"), ALL),
    ("vllm.multimodal.encoder_budget", "MultiModalBudget", None, ALL),
)


def _minor(version: str) -> str:
    return ".".join(version.split("+", 1)[0].split(".")[:2])


def entries(version: str):
    m = _minor(version)
    return [e for e in API if e[3] == ALL or e[3] == m]


def _resolve(module: str, path: str):
    obj = importlib.import_module(module)
    owner = None
    for part in path.split("."):
        owner = obj
        if inspect.isclass(obj) and part not in dir(obj):
            fields = getattr(obj, "__dataclass_fields__", {}) or getattr(obj, "__annotations__", {})
            if part in fields:  # an instance attribute declared on the class
                return owner, None
        obj = getattr(obj, part)
    return owner, obj


def problems(version: str | None = None) -> list[str]:
    """What does not match the table on the installed vLLM (empty: everything vtw uses is there)."""
    from ._version import installed

    version = installed() if version is None else version
    out = []
    for module, path, params, _ in entries(version or ""):
        where = f"{module}.{path}"
        try:
            _, obj = _resolve(module, path)
        except Exception as e:  # ImportError, AttributeError
            out.append(f"{where}: missing ({type(e).__name__}: {e})")
            continue
        if params is None or obj is None:
            continue
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError) as e:
            out.append(f"{where}: no signature ({e})")
            continue
        names = [p for p in sig.parameters]
        if isinstance(params, set):
            missing = sorted(params - set(names))
            if missing:
                out.append(f"{where}: no field/parameter {', '.join(missing)}")
        elif tuple(names[: len(params)]) != tuple(params):
            out.append(f"{where}: parameters {tuple(names[:len(params)])}, vtw expects {tuple(params)}")
    return out
