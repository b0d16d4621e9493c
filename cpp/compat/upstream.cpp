// compat layer for upstream llama.cpp (and forks that keep its API, such as turboquant).
#include "compat/compat.hpp"
#include "compat/shared.hpp"

#include "chat.h"
#include "common.h"
#include "json-schema-to-grammar.h"
#include "json.h"
#include "llama.h"
#include "sampling.h"

#include <algorithm>
#include <mutex>
#include <thread>

namespace PYLOCALAI_ENGINE_NS {
namespace compat {

namespace {

std::once_flag g_backend_once;


// The devices a model offloads to when it names RPC servers: the servers' devices first (as
// llama.cpp orders them, to keep network transfers low), then the local GPUs, NULL-terminated.
// The servers are not registered with ggml globally, as llama.cpp's own --rpc does: a registered
// server would be one of every later model's devices, so a server that went away would abort the
// loading of models that never asked for it.
std::vector<ggml_backend_dev_t> rpc_model_devices(const std::vector<std::string> & servers) {
    ggml_backend_reg_t reg = ggml_backend_reg_by_name("RPC");
    if (reg == nullptr) {
        throw std::invalid_argument("this build has no ggml RPC backend");
    }
    using add_server_fn = ggml_backend_reg_t (*)(const char *);
    auto fn = reinterpret_cast<add_server_fn>(ggml_backend_reg_get_proc_address(reg, "ggml_backend_rpc_add_server"));
    if (fn == nullptr) {
        throw std::invalid_argument("ggml RPC backend lacks ggml_backend_rpc_add_server");
    }
    std::vector<ggml_backend_dev_t> devices;
    for (const auto & endpoint : servers) {
        ggml_backend_reg_t server = fn(endpoint.c_str());
        if (server == nullptr) {
            throw EngineError("cannot reach RPC server " + endpoint);
        }
        for (size_t i = 0; i < ggml_backend_reg_dev_count(server); ++i) {
            devices.push_back(ggml_backend_reg_dev_get(server, i));
        }
    }
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_GPU) {
            devices.push_back(dev);
        }
    }
    devices.push_back(nullptr);
    return devices;
}

PerModelCache<common_chat_templates_ptr> g_templates;

const common_chat_templates * templates_for(llama_model * model, const std::string & override_src) {
    return g_templates.get(model, override_src, [&] { return common_chat_templates_init(model, override_src); }).get();
}

// ModelParams/ContextParams carry ik_llama.cpp's own knobs too; this fork has none of them.
void reject_ik_only(const char * name, bool is_set) {
    if (is_set) {
        throw std::invalid_argument(std::string("'") + name + "' is an ik_llama.cpp option; the " PYLOCALAI_ENGINE_NAME
                                    " engine does not have it");
    }
}

void reject_ik_only(const ModelParams & p) {
    reject_ik_only("repack_tensors", p.repack_tensors.has_value());
    reject_ik_only("use_thp", p.use_thp.has_value());
    reject_ik_only("merge_qkv", p.merge_qkv.has_value());
    reject_ik_only("merge_up_gate_exps", p.merge_up_gate_exps.has_value());
    reject_ik_only("validate_quants", p.validate_quants.has_value());
    reject_ik_only("mla", p.mla.has_value());
    reject_ik_only("n_cpu_moe", p.n_cpu_moe.has_value());
}

void reject_ik_only(const ContextParams & p) {
    reject_ik_only("mla_attn", p.mla_attn.has_value());
    reject_ik_only("attn_max_batch", p.attn_max_batch.has_value());
    reject_ik_only("fused_moe_up_gate", p.fused_moe_up_gate.has_value());
    reject_ik_only("fused_up_gate", p.fused_up_gate.has_value());
    reject_ik_only("fused_mmad", p.fused_mmad.has_value());
    reject_ik_only("grouped_expert_routing", p.grouped_expert_routing.has_value());
    reject_ik_only("rope_cache", p.rope_cache.has_value());
    reject_ik_only("graph_reuse", p.graph_reuse.has_value());
    reject_ik_only("min_experts", p.min_experts.has_value());
    reject_ik_only("thresh_experts", p.thresh_experts.has_value());
    reject_ik_only("only_active_experts", p.only_active_experts.has_value());
    reject_ik_only("k_cache_hadamard", p.k_cache_hadamard.has_value());
    reject_ik_only("v_cache_hadamard", p.v_cache_hadamard.has_value());
}

}  // namespace

void backend_init() {
    std::call_once(g_backend_once, [] {
        llama_log_set(engine_log, nullptr);
        llama_backend_init();
        ggml_backend_load_all();
    });
}

std::vector<std::string> backend_names() {
    std::vector<std::string> names;
    for (size_t i = 0; i < ggml_backend_reg_count(); ++i) {
        names.emplace_back(ggml_backend_reg_name(ggml_backend_reg_get(i)));
    }
    return names;
}

std::vector<std::string> cache_type_names() {
    return {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"};
}

llama_model * load_model(const ModelParams & p) {
    reject_ik_only(p);
    backend_init();
    llama_model_params mp = llama_model_default_params();
    std::vector<ggml_backend_dev_t> devices;  // outlives the load, which reads the list
    if (!p.rpc_servers.empty()) {
        devices = rpc_model_devices(p.rpc_servers);
        mp.devices = devices.data();
    }
    mp.n_gpu_layers = p.n_gpu_layers;
    mp.main_gpu = p.main_gpu;
    mp.load_mode = p.use_mmap ? (p.use_mlock ? LLAMA_LOAD_MODE_MMAP_MLOCK : LLAMA_LOAD_MODE_MMAP)
                              : (p.use_mlock ? LLAMA_LOAD_MODE_MLOCK : LLAMA_LOAD_MODE_NONE);
    mp.check_tensors = p.check_tensors;
    mp.vocab_only = p.vocab_only;
    std::vector<float> split;
    mp.tensor_split = tensor_split_into(p.tensor_split, split);
    return llama_model_load_from_file(p.path.c_str(), mp);
}

void free_model(llama_model * model) {
    g_templates.forget(model);
    llama_model_free(model);
}

void fill_model_info(llama_model * model, ModelInfo & info) {
    fill_shared_model_info(model, info);
    char buf[512];
    if (llama_model_meta_val_str(model, "general.architecture", buf, sizeof(buf)) >= 0) {
        info.architecture = buf;
    }
    info.n_ctx_train = llama_model_n_ctx_train(model);
    info.n_layer = llama_model_n_layer(model);
    info.eot = llama_vocab_eot(llama_model_get_vocab(model));
}

llama_context * new_context(llama_model * model, const ContextParams & p, TraceFn trace, void * trace_data) {
    reject_ik_only(p);
    llama_context_params cp = llama_context_default_params();
    const int32_t hw = std::max(1, static_cast<int32_t>(std::thread::hardware_concurrency()));
    cp.n_ctx = p.n_ctx;
    cp.n_batch = p.n_batch;
    cp.n_ubatch = std::min(p.n_ubatch, p.n_batch);
    cp.n_seq_max = p.n_seq_max;
    cp.n_threads = p.n_threads > 0 ? p.n_threads : hw;
    cp.n_threads_batch = p.n_threads_batch > 0 ? p.n_threads_batch : cp.n_threads;
    cp.flash_attn_type = p.flash_attn < 0 ? LLAMA_FLASH_ATTN_TYPE_AUTO
                        : (p.flash_attn == 0 ? LLAMA_FLASH_ATTN_TYPE_DISABLED : LLAMA_FLASH_ATTN_TYPE_ENABLED);
    cp.type_k = ggml_type_from_name(p.type_k);
    cp.type_v = ggml_type_from_name(p.type_v);
    cp.kv_unified = p.kv_unified;
    cp.swa_full = p.swa_full;
    cp.embeddings = p.embeddings;
    cp.offload_kqv = p.offload_kqv;
    cp.op_offload = p.op_offload;
    cp.rope_freq_base = p.rope_freq_base;
    cp.rope_freq_scale = p.rope_freq_scale;
    cp.no_perf = true;
    cp.cb_eval = trace;
    cp.cb_eval_user_data = trace_data;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (ctx == nullptr) {
        throw EngineError("failed to create the llama context (out of memory, or unsupported settings "
                          "such as a quantized V cache without flash attention)");
    }
    return ctx;
}

uint32_t n_ctx_seq(llama_context * ctx, const ContextParams & /*params*/) { return llama_n_ctx_seq(ctx); }
uint32_t n_seq_max(llama_context * ctx, const ContextParams & /*params*/) { return llama_n_seq_max(ctx); }

int32_t tokenize(const llama_vocab * vocab, const std::string & text, int32_t * out, int32_t n, bool add_special,
                 bool parse_special) {
    return llama_tokenize(vocab, text.data(), static_cast<int32_t>(text.size()), out, n, add_special, parse_special);
}

int32_t token_to_piece(const llama_vocab * vocab, int32_t token, char * buf, int32_t n, bool special) {
    return llama_token_to_piece(vocab, token, buf, n, 0, special);
}

bool seq_rm(llama_context * ctx, int32_t seq, int32_t p0, int32_t p1) {
    return llama_memory_seq_rm(llama_get_memory(ctx), seq, p0, p1);
}
void seq_cp(llama_context * ctx, int32_t src, int32_t dst, int32_t p0, int32_t p1) {
    llama_memory_seq_cp(llama_get_memory(ctx), src, dst, p0, p1);
}
void seq_keep(llama_context * ctx, int32_t seq) { llama_memory_seq_keep(llama_get_memory(ctx), seq); }
void seq_add(llama_context * ctx, int32_t seq, int32_t p0, int32_t p1, int32_t delta) {
    llama_memory_seq_add(llama_get_memory(ctx), seq, p0, p1, delta);
}
int32_t seq_pos_max(llama_context * ctx, int32_t seq) { return llama_memory_seq_pos_max(llama_get_memory(ctx), seq); }
int32_t seq_pos_min(llama_context * ctx, int32_t seq) { return llama_memory_seq_pos_min(llama_get_memory(ctx), seq); }
int32_t n_swa(const llama_model * model) { return llama_model_n_swa(model); }
bool checkpoints_supported() { return true; }
std::vector<uint8_t> checkpoint_save(llama_context * ctx, int32_t seq, bool partial) {
    const llama_state_seq_flags flags = partial ? LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY : 0;
    std::vector<uint8_t> out(llama_state_seq_get_size_ext(ctx, seq, flags));
    out.resize(llama_state_seq_get_data_ext(ctx, out.data(), out.size(), seq, flags));
    return out;
}
bool checkpoint_load(llama_context * ctx, int32_t seq, const uint8_t * data, size_t size, bool partial) {
    const llama_state_seq_flags flags = partial ? LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY : 0;
    return llama_state_seq_set_data_ext(ctx, data, size, seq, flags) == size;
}
void memory_clear(llama_context * ctx) { llama_memory_clear(llama_get_memory(ctx), true); }
bool can_shift(llama_context * ctx) { return llama_memory_can_shift(llama_get_memory(ctx)); }
int32_t graphs_reused(llama_context * ctx) { return llama_perf_context(ctx).n_reused; }

ChatPrompt chat_apply(llama_model * model, const ChatOptions & o) {
    const common_chat_templates * tmpls = templates_for(model, o.template_override);
    const llama_vocab * vocab = llama_model_get_vocab(model);
    common_chat_templates_inputs in;
    in.messages = common_chat_msgs_parse_oaicompat(common_json::parse(o.messages_json));
    if (!o.tools_json.empty()) {
        in.tools = common_chat_tools_parse_oaicompat(common_json::parse(o.tools_json));
    }
    in.tool_choice = common_chat_tool_choice_parse_oaicompat(o.tool_choice);
    in.parallel_tool_calls = o.parallel_tool_calls;
    in.add_generation_prompt = o.add_generation_prompt;
    in.enable_thinking = o.enable_thinking;
    in.json_schema = o.json_schema;
    in.grammar = o.grammar;
    in.use_jinja = true;
    in.add_bos = llama_vocab_get_add_bos(vocab);
    in.add_eos = llama_vocab_get_add_eos(vocab);
    in.reasoning_format = COMMON_REASONING_FORMAT_DEEPSEEK;
    for (const auto & [k, v] : o.template_kwargs) {
        in.chat_template_kwargs[k] = v;
    }
    common_chat_params r = common_chat_templates_apply(tmpls, in);
    ChatPrompt out;
    out.prompt = r.prompt;
    out.grammar = r.grammar;
    out.grammar_lazy = r.grammar_lazy;
    for (const auto & t : r.grammar_triggers) {
        out.grammar_triggers.push_back({static_cast<int32_t>(t.type), t.value, t.token});
    }
    out.preserved_tokens = r.preserved_tokens;
    out.additional_stops = r.additional_stops;
    out.format = static_cast<int32_t>(r.format);
    out.format_name = common_chat_format_name(r.format);
    out.generation_prompt = r.generation_prompt;
    out.parser = r.parser;
    out.supports_thinking = r.supports_thinking;
    out.thinking_start_tag = r.thinking_start_tag;
    out.thinking_end_tags = r.thinking_end_tags;
    return out;
}

std::string chat_parse(const std::string & text, const ChatParseOptions & o) {
    common_chat_parser_params pp;
    pp.format = static_cast<common_chat_format>(o.format);
    pp.reasoning_format = o.reasoning ? COMMON_REASONING_FORMAT_DEEPSEEK : COMMON_REASONING_FORMAT_NONE;
    pp.generation_prompt = o.generation_prompt;
    pp.parse_tool_calls = o.parse_tool_calls;
    if (!o.parser.empty()) {
        pp.parser.load(o.parser);
    }
    common_chat_msg msg = common_chat_parse(text, o.is_partial, pp);
    return msg.to_json_oaicompat().dump();
}

std::string json_schema_to_gbnf(const std::string & schema_json) {
    return json_schema_to_grammar(common_json::parse(schema_json));
}

}  // namespace compat

struct SeqSampler::Impl {
    common_sampler_ptr smpl;
    // Plain greedy decoding (no grammar, bias or penalties) is an argmax over the logits row; the
    // sampler stack would first build and filter a candidate array over the whole vocabulary.
    bool plain_greedy = false;
    int32_t n_vocab = 0;
    std::vector<uint8_t> banned;  // end-of-generation tokens when ignore_eos
};

SeqSampler::SeqSampler(llama_model * model, const SamplingParams & p, const std::vector<int32_t> & history)
    : impl_(std::make_unique<Impl>()) {
    const llama_vocab * vocab = llama_model_get_vocab(model);
    if (p.temperature <= 0.0f && p.grammar.empty() && p.logit_bias.empty() && p.repeat_penalty == 1.0f &&
        p.presence_penalty == 0.0f && p.frequency_penalty == 0.0f) {
        impl_->plain_greedy = true;
        impl_->n_vocab = llama_vocab_n_tokens(vocab);
        impl_->banned.assign(static_cast<size_t>(impl_->n_vocab), 0);
        if (p.ignore_eos) {
            for (int32_t t = 0; t < impl_->n_vocab; ++t) {
                impl_->banned[t] = llama_vocab_is_eog(vocab, t) ? 1 : 0;
            }
        }
        return;
    }
    common_params_sampling sp;
    sp.seed = p.seed;
    sp.temp = p.temperature;
    sp.top_k = p.top_k;
    sp.top_p = p.top_p;
    sp.min_p = p.min_p;
    sp.typ_p = p.typical_p;
    sp.penalty_repeat = p.repeat_penalty;
    sp.penalty_present = p.presence_penalty;
    sp.penalty_freq = p.frequency_penalty;
    sp.penalty_last_n = p.repeat_last_n;
    sp.ignore_eos = p.ignore_eos;
    sp.n_probs = p.n_probs;
    sp.no_perf = true;
    for (const auto & [tok, bias] : p.logit_bias) {
        sp.logit_bias.push_back({tok, bias});
    }
    if (p.ignore_eos) {
        for (int32_t t = 0; t < llama_vocab_n_tokens(vocab); ++t) {
            if (llama_vocab_is_eog(vocab, t)) {
                sp.logit_bias_eog.push_back({t, -INFINITY});
            }
        }
    }
    if (!p.grammar.empty()) {
        if (p.grammar_type < COMMON_GRAMMAR_TYPE_USER || p.grammar_type > COMMON_GRAMMAR_TYPE_TOOL_CALLS) {
            throw std::invalid_argument("grammar_type must be 1 (user), 2 (output format) or 3 (tool calls)");
        }
        sp.grammar = common_grammar(static_cast<common_grammar_type>(p.grammar_type), p.grammar);
        sp.generation_prompt = p.generation_prompt;
        sp.grammar_lazy = p.grammar_lazy;
        for (const auto & t : p.grammar_triggers) {
            sp.grammar_triggers.push_back({static_cast<common_grammar_trigger_type>(t.type), t.value, t.token});
        }
    }
    sp.preserved_tokens.insert(p.preserved_tokens.begin(), p.preserved_tokens.end());
    common_sampler * s = common_sampler_init(model, sp);
    if (s == nullptr) {
        throw std::invalid_argument("invalid sampling parameters or grammar (the GBNF did not parse)");
    }
    impl_->smpl.reset(s);
    for (int32_t t : history) {
        common_sampler_accept(s, t, false);
    }
}

SeqSampler::~SeqSampler() = default;

int32_t SeqSampler::sample_and_accept(llama_context * ctx, int32_t idx) {
    if (impl_->plain_greedy) {
        const int32_t best = compat::greedy_token(llama_get_logits_ith(ctx, idx), impl_->n_vocab, impl_->banned.data());
        if (best < 0) {
            throw EngineError("the model produced no finite logit (NaN weights?)");
        }
        return best;
    }
    const llama_token tok = common_sampler_sample(impl_->smpl.get(), ctx, idx);
    common_sampler_accept(impl_->smpl.get(), tok, true);
    return tok;
}

}  // namespace PYLOCALAI_ENGINE_NS
