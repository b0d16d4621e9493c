// compat layer for ik_llama.cpp: the older llama.cpp API (model-based vocab calls, ctx-based KV
// calls, no sampler chain) plus ik's own model and context knobs.
#include "compat/compat.hpp"
#include "compat/shared.hpp"

#include "chat.h"
#include "common.h"
#include "ggml-rpc.h"
#include "json-schema-to-grammar.h"
#include "llama.h"
#include "log.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdlib>
#include <cmath>
#include <deque>
#include <mutex>
#include <random>
#include <thread>

#if defined(__aarch64__) && defined(__linux__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

namespace PYLOCALAI_ENGINE_NS {
namespace compat {

namespace {

std::once_flag g_backend_once;


// ik's fast paths (the IQK GEMM and flash-attention kernels) need AVX2 on x86 and dotprod on Arm,
// and ggml is compiled for one ISA (no runtime dispatch): running it on a CPU without an extension
// it was built with dies of SIGILL. Say so instead. (Static initializers run before this check, but
// they are plain C++ that the compiler is unlikely to vectorize with those extensions.)
void check_cpu() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    struct Feature {
        const char * name;
        bool built;
        bool present;
    };
    const Feature features[] = {
        {"AVX2", true, static_cast<bool>(__builtin_cpu_supports("avx2"))},
        {"FMA", ggml_cpu_has_fma() != 0, static_cast<bool>(__builtin_cpu_supports("fma"))},
        {"AVX512F", ggml_cpu_has_avx512() != 0, static_cast<bool>(__builtin_cpu_supports("avx512f"))},
        {"AVX512VNNI", ggml_cpu_has_avx512_vnni() != 0, static_cast<bool>(__builtin_cpu_supports("avx512vnni"))},
        {"AVX512VBMI", ggml_cpu_has_avx512_vbmi() != 0, static_cast<bool>(__builtin_cpu_supports("avx512vbmi"))},
        {"AVX512BF16", ggml_cpu_has_avx512_bf16() != 0, static_cast<bool>(__builtin_cpu_supports("avx512bf16"))},
    };
    // PYLOCALAI_HIDE_CPU_FEATURE=AVX2 makes this check see a CPU without that extension (tests)
    const char * hidden = std::getenv("PYLOCALAI_HIDE_CPU_FEATURE");
    for (const auto & f : features) {
        const bool present = f.present && !(hidden != nullptr && std::string(hidden) == f.name);
        if (f.built && !present) {
            throw EngineError(std::string("ik_llama.cpp needs a CPU with AVX2 (and every x86 extension it was built "
                                          "for); this CPU lacks ") + f.name + ". Use the llama-cpp backend instead.");
        }
    }
#elif defined(__aarch64__) && defined(__linux__)
    if ((getauxval(AT_HWCAP) & HWCAP_ASIMDDP) == 0) {
        throw EngineError("ik_llama.cpp needs an Arm CPU with the dot-product extension (asimddp); this CPU lacks "
                          "it. Use the llama-cpp backend instead.");
    }
#endif
}

// ik accepts only the cache types it lists (it has more than upstream, and some that it cannot use)
ggml_type cache_type_from_name(const std::string & name) {
    const auto names = cache_type_names();
    if (std::find(names.begin(), names.end(), name) == names.end()) {
        throw std::invalid_argument("unknown KV cache type '" + name + "'");
    }
    return ggml_type_from_name(name);
}

struct Templates {
    common_chat_templates_ptr tmpls;
    bool supports_thinking = false;  // enable_thinking changes what the template renders
};

PerModelCache<Templates> g_templates;

const Templates & templates_for(llama_model * model, const std::string & override_src) {
    return g_templates.get(model, override_src, [&] {
        Templates t;
        t.tmpls = common_chat_templates_init(model, override_src);
        t.supports_thinking = common_chat_templates_support_enable_thinking(t.tmpls.get());
        return t;
    });
}

std::string model_arch(const llama_model * model) {
    char buf[128];
    return llama_model_meta_val_str(model, "general.architecture", buf, sizeof(buf)) >= 0 ? std::string(buf)
                                                                                          : std::string();
}

}  // namespace

void backend_init() {
    // A failed check throws every time (call_once retries after an exception): each import or load
    // reports it.
    std::call_once(g_backend_once, [] {
        check_cpu();
        log_disable();  // ik's common library would otherwise write ./llama.log (e.g. parsing partial tool calls)
        llama_log_set(engine_log, nullptr);
        llama_backend_init();
    });
}

std::vector<std::string> backend_names() {
    std::vector<std::string> names;
    for (size_t i = 0; i < ggml_backend_reg_get_count(); ++i) {
        names.emplace_back(ggml_backend_reg_get_name(i));
    }
    return names;
}

std::vector<std::string> cache_type_names() {
    return {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1", "q6_0", "q8_KV"};
}

llama_model * load_model(const ModelParams & p) {
    backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.main_gpu = p.main_gpu;
    mp.use_mmap = p.use_mmap;
    mp.use_mlock = p.use_mlock;
    mp.check_tensors = p.check_tensors;
    mp.vocab_only = p.vocab_only;
    std::vector<float> split;
    mp.tensor_split = tensor_split_into(p.tensor_split, split);
    // ik takes the RPC devices as one comma-separated string of "host:port|device": each server
    // stands for all of its devices, as ik's own --rpc expands it. (A bare "host:port" would parse
    // to an empty endpoint.)
    std::string rpc;
    std::string rpc_devices;  // the same devices by ik's names for them, "RPC<d>[host:port]"
    for (const auto & endpoint : p.rpc_servers) {
        if (endpoint.find('|') != std::string::npos) {
            rpc += (rpc.empty() ? "" : ",") + endpoint;
            continue;
        }
        const uint32_t n_dev = ggml_backend_rpc_get_device_count(endpoint.c_str());
        if (n_dev == 0) {
            throw EngineError("cannot reach RPC server " + endpoint);
        }
        for (uint32_t d = 0; d < n_dev; ++d) {
            rpc += (rpc.empty() ? "" : ",") + endpoint + "|" + std::to_string(d);
            rpc_devices += (rpc_devices.empty() ? "RPC" : ",RPC") + std::to_string(d) + "[" + endpoint + "]";
        }
    }
    if (!rpc.empty()) {
        mp.rpc_servers = rpc.c_str();
    }
    // Without a GPU backend or RPC server ik takes the CPU for offload device 0 and warns that it
    // has no free memory. It has no "negative: all layers" either.
    const bool has_gpu = backend_names().size() > 1;  // ik lists its GPU backends beside the CPU (RPC is not one)
    const bool can_offload = has_gpu || !rpc.empty();
    if (!has_gpu && !rpc_devices.empty()) {
        // A CPU-only build would also count the CPU as an offload device with no free memory, and split
        // the offloaded layers by free memory: offload to the RPC servers' devices alone.
        mp.devices = rpc_devices.c_str();
    }
    mp.n_gpu_layers = !can_offload ? 0 : (p.n_gpu_layers < 0 ? 999 : p.n_gpu_layers);
    // ik's own CLI default (its C default is 0): MLA-ready weights for the context's default mla_attn=3
    mp.mla = p.mla.value_or(3);
    mp.repack_tensors = p.repack_tensors.value_or(mp.repack_tensors);
    mp.use_thp = p.use_thp.value_or(mp.use_thp);
    mp.merge_qkv = p.merge_qkv.value_or(mp.merge_qkv);
    mp.merge_up_gate_exps = p.merge_up_gate_exps.value_or(mp.merge_up_gate_exps);
    mp.validate_quants = p.validate_quants.value_or(mp.validate_quants);
    if (p.n_cpu_moe.has_value() && *p.n_cpu_moe < 0) {
        throw std::invalid_argument("n_cpu_moe must be >= 0");
    }
    mp.ncmoe = p.n_cpu_moe.value_or(mp.ncmoe);
    return llama_model_load_from_file(p.path.c_str(), mp);
}

void free_model(llama_model * model) {
    g_templates.forget(model);
    llama_free_model(model);
}

void fill_model_info(llama_model * model, ModelInfo & info) {
    fill_shared_model_info(model, info);
    info.architecture = model_arch(model);
    info.n_ctx_train = llama_n_ctx_train(model);
    info.n_layer = llama_n_layer(model);
    info.eot = llama_token_eot(model);
}

llama_context * new_context(llama_model * model, const ContextParams & p, TraceFn trace, void * trace_data) {
    if (!p.op_offload) {
        throw std::invalid_argument("op_offload=false is not supported by ik_llama.cpp");
    }
    llama_context_params cp = llama_context_default_params();
    const uint32_t hw = std::max(1u, std::thread::hardware_concurrency());
    cp.n_ctx = p.n_ctx;
    cp.n_batch = p.n_batch;
    cp.n_ubatch = std::min(p.n_ubatch, p.n_batch);
    cp.n_seq_max = p.n_seq_max;
    cp.n_threads = p.n_threads > 0 ? static_cast<uint32_t>(p.n_threads) : hw;
    cp.n_threads_batch = p.n_threads_batch > 0 ? static_cast<uint32_t>(p.n_threads_batch) : cp.n_threads;
    // "auto" is on, ik's own default: its CPU kernel prefills faster (SmolLM2 pp512 +27 %, Gemma 3
    // +13 % on 2 cores) and keeps V untransposed (rows n_ctx apart otherwise: decode 4.9 % slower at
    // 8,192 cells than at 256, against 1.3 % with it). Several sequences in the cache need patch
    // 0005 (before it, GGML_ASSERT(S > 0) ended the process).
    cp.flash_attn = p.flash_attn != 0;
    cp.type_k = cache_type_from_name(p.type_k);
    cp.type_v = cache_type_from_name(p.type_v);
    if (!cp.flash_attn && ggml_is_quantized(cp.type_v)) {
        throw std::invalid_argument("a quantized V cache needs flash attention (flash_attn auto or on)");
    }
    // kv_unified: ik has one cache that all sequences share; n_ctx_seq splits it when not unified.
    // swa_full: ik keeps a full-size cache for sliding-window layers either way.
    cp.embeddings = p.embeddings;
    cp.offload_kqv = p.offload_kqv;
    cp.rope_freq_base = p.rope_freq_base;
    cp.rope_freq_scale = p.rope_freq_scale;
    cp.mla_attn = p.mla_attn.value_or(cp.mla_attn);
    if (cp.mla_attn < 0 || cp.mla_attn > 3) {
        throw std::invalid_argument("mla_attn must be 0, 1, 2 or 3");
    }
    cp.attn_max_batch = p.attn_max_batch.value_or(cp.attn_max_batch);
    cp.fused_moe_up_gate = p.fused_moe_up_gate.value_or(cp.fused_moe_up_gate);
    cp.fused_up_gate = p.fused_up_gate.value_or(cp.fused_up_gate);
    cp.fused_mmad = p.fused_mmad.value_or(cp.fused_mmad);
    cp.grouped_expert_routing = p.grouped_expert_routing.value_or(cp.grouped_expert_routing);
    cp.rope_cache = p.rope_cache.value_or(cp.rope_cache);
    cp.graph_reuse = p.graph_reuse.value_or(cp.graph_reuse);
    cp.min_experts = p.min_experts.value_or(cp.min_experts);
    cp.thresh_experts = p.thresh_experts.value_or(cp.thresh_experts);
    cp.only_active_experts = p.only_active_experts.value_or(cp.only_active_experts);
    cp.k_cache_hadamard = p.k_cache_hadamard.value_or(cp.k_cache_hadamard);
    cp.v_cache_hadamard = p.v_cache_hadamard.value_or(cp.v_cache_hadamard);
    if (cp.v_cache_hadamard && !cp.flash_attn) {
        throw std::invalid_argument("v_cache_hadamard needs flash attention");
    }
    cp.cb_eval = trace;
    cp.cb_eval_user_data = trace_data;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (ctx == nullptr) {
        throw EngineError("failed to create the llama context (out of memory, or unsupported settings)");
    }
    return ctx;
}

uint32_t n_ctx_seq(llama_context * ctx, const ContextParams & params) {
    const uint32_t n_ctx = llama_n_ctx(ctx);
    return params.kv_unified ? n_ctx : n_ctx / n_seq_max(ctx, params);
}

// ik's llama_n_seq_max() reports the KV cache size, not the sequence count.
uint32_t n_seq_max(llama_context * /*ctx*/, const ContextParams & params) { return std::max(1u, params.n_seq_max); }

int32_t tokenize(const llama_vocab * vocab, const std::string & text, int32_t * out, int32_t n, bool add_special,
                 bool parse_special) {
    return llama_vocab_tokenize(vocab, text.data(), static_cast<int32_t>(text.size()), out, n, add_special, parse_special);
}

int32_t token_to_piece(const llama_vocab * vocab, int32_t token, char * buf, int32_t n, bool special) {
    return llama_token_to_piece_vocab(vocab, token, buf, n, 0, special);
}

bool seq_rm(llama_context * ctx, int32_t seq, int32_t p0, int32_t p1) { return llama_kv_cache_seq_rm(ctx, seq, p0, p1); }
void seq_cp(llama_context * ctx, int32_t src, int32_t dst, int32_t p0, int32_t p1) {
    llama_kv_cache_seq_cp(ctx, src, dst, p0, p1);
}
void seq_keep(llama_context * ctx, int32_t seq) { llama_kv_cache_seq_keep(ctx, seq); }
void seq_add(llama_context * ctx, int32_t seq, int32_t p0, int32_t p1, int32_t delta) {
    llama_kv_cache_seq_add(ctx, seq, p0, p1, delta);
}
int32_t seq_pos_max(llama_context * ctx, int32_t seq) {
    // ik's pos_max answers 0 for an empty sequence where upstream answers -1; its pos_min still
    // answers -1 (except for recurrent caches, where it is pos_max again).
    return llama_kv_cache_seq_pos_min(ctx, seq) < 0 ? -1 : llama_kv_cache_seq_pos_max(ctx, seq);
}
int32_t seq_pos_min(llama_context * ctx, int32_t seq) { return llama_kv_cache_seq_pos_min(ctx, seq); }
// ik keeps a whole-context cache for sliding-window layers (nothing is dropped), so no partial
// checkpoints are needed there; whole-sequence states are.
int32_t n_swa(const llama_model * /*model*/) { return 0; }
bool checkpoints_supported() { return false; }
std::vector<uint8_t> checkpoint_save(llama_context * ctx, int32_t seq, bool partial) {
    if (partial) {
        return {};
    }
    std::vector<uint8_t> out(llama_state_seq_get_size(ctx, seq, 0));
    out.resize(llama_state_seq_get_data(ctx, out.data(), out.size(), seq, 0));
    return out;
}
bool checkpoint_load(llama_context * ctx, int32_t seq, const uint8_t * data, size_t size, bool partial) {
    return !partial && llama_state_seq_set_data(ctx, data, size, seq, 0) == size;
}
void memory_clear(llama_context * ctx) { llama_kv_cache_clear(ctx); }
int32_t graphs_reused(llama_context * /*ctx*/) { return -1; }  // ik keeps no such count

bool can_shift(llama_context * ctx) {
    // ik has no can_shift call; these are the cases its K-shift refuses (MLA caches, imrope) or that
    // keep no per-position cache at all.
    const llama_model * model = llama_get_model(ctx);
    const std::string arch = model_arch(model);
    return !llama_model_is_recurrent(model) && !llama_model_is_hybrid(model) && arch != "deepseek2" &&
           arch != "glm-dsa" && llama_rope_type(model) != LLAMA_ROPE_TYPE_IMROPE;
}

ChatPrompt chat_apply(llama_model * model, const ChatOptions & o) {
    const Templates & t = templates_for(model, o.template_override);
    const llama_vocab * vocab = llama_model_get_vocab(model);
    common_chat_templates_inputs in;
    in.messages = common_chat_msgs_parse_oaicompat(nlohmann::ordered_json::parse(o.messages_json));
    if (!o.tools_json.empty()) {
        in.tools = common_chat_tools_parse_oaicompat(nlohmann::ordered_json::parse(o.tools_json));
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
    common_chat_params r = common_chat_templates_apply(t.tmpls.get(), in);
    ChatPrompt out;
    out.prompt = r.prompt;
    out.grammar = r.grammar;
    out.grammar_lazy = r.grammar_lazy;
    for (const auto & g : r.grammar_triggers) {
        out.grammar_triggers.push_back({static_cast<int32_t>(g.type), g.value, g.token});
    }
    out.preserved_tokens = r.preserved_tokens;
    out.additional_stops = r.additional_stops;
    out.format = static_cast<int32_t>(r.format);
    out.format_name = common_chat_format_name(r.format);
    out.parser = r.parser;
    out.supports_thinking = t.supports_thinking || r.thinking_forced_open;
    // ik's templates report only that the prompt ends inside an opened reasoning block (its opening
    // tag, e.g. "<think>\n"). That tail is the generation prompt the answer continues, and its being
    // non-empty is what chat_parse reads back. ik's grammars already allow for it: SeqSampler never
    // feeds it to them.
    if (r.thinking_forced_open) {
        const size_t open = r.prompt.rfind('<');
        out.generation_prompt = open == std::string::npos ? std::string() : r.prompt.substr(open);
    }
    return out;
}

std::string chat_parse(const std::string & text, const ChatParseOptions & o) {
    if (o.format < 0 || o.format >= COMMON_CHAT_FORMAT_COUNT) {
        throw std::invalid_argument("unknown chat format " + std::to_string(o.format));
    }
    common_chat_syntax syntax;
    syntax.format = static_cast<common_chat_format>(o.format);
    syntax.reasoning_format = o.reasoning ? COMMON_REASONING_FORMAT_DEEPSEEK : COMMON_REASONING_FORMAT_NONE;
    syntax.thinking_forced_open = !o.generation_prompt.empty();
    syntax.parse_tool_calls = o.parse_tool_calls;
    if (!o.parser.empty()) {
        syntax.parser.load(o.parser);
    }
    common_chat_msg msg = common_chat_parse(text, o.is_partial, syntax);
    return msg.to_json_oaicompat().dump();
}

std::string json_schema_to_gbnf(const std::string & schema_json) {
    return json_schema_to_grammar(nlohmann::ordered_json::parse(schema_json));
}

}  // namespace compat

// ik has no sampler chain, and its common_sampler edits the logits in place (logit bias) and counts
// never-seen token 0 in the penalty window. So this is upstream's chain rebuilt from ik's legacy
// llama_sample_* steps over a private copy of the logits row: logit bias, penalties, top-k,
// typical, top-p, min-p, temperature, then a draw from this sequence's own seeded generator.
// Grammars are llama_grammar objects, checked on the drawn token first and applied to the whole
// vocabulary only when it is rejected (as upstream's common_sampler_sample does).
struct SeqSampler::Impl {
    SamplingParams p;
    const llama_vocab * vocab = nullptr;
    int32_t n_vocab = 0;
    bool plain_greedy = false;
    std::vector<uint8_t> banned;  // plain greedy: end-of-generation tokens when ignore_eos
    std::vector<std::pair<int32_t, float>> bias;
    std::deque<int32_t> recent;   // the penalty window
    size_t window = 0;
    llama_grammar * grammar = nullptr;
    std::mt19937 rng;
    std::vector<llama_token_data> cur;

    ~Impl() {
        if (grammar != nullptr) {
            llama_grammar_free(grammar);
        }
    }

    void remember(int32_t tok) {
        if (window == 0) {
            return;
        }
        recent.push_back(tok);
        if (recent.size() > window) {
            recent.pop_front();
        }
    }

    // The candidates from the logits row, with bias and penalties.
    llama_token_data_array candidates(llama_context * ctx, const float * logits) {
        cur.resize(static_cast<size_t>(n_vocab));
        for (int32_t t = 0; t < n_vocab; ++t) {
            cur[t] = llama_token_data{t, logits[t], 0.0f};
        }
        for (const auto & [tok, b] : bias) {
            cur[tok].logit += b;
        }
        llama_token_data_array arr{cur.data(), cur.size(), -1, false};
        if (!recent.empty()) {
            const std::vector<llama_token> last(recent.begin(), recent.end());
            llama_sample_repetition_penalties(ctx, &arr, last.data(), last.size(), p.repeat_penalty,
                                              p.frequency_penalty, p.presence_penalty);
        }
        return arr;
    }

    // Filters and draw; -1 when every candidate is masked out.
    int32_t draw(llama_context * ctx, llama_token_data_array & arr) {
        if (p.temperature <= 0.0f) {  // greedy: the first maximum, as upstream's temp sampler keeps
            int32_t best = -1;
            float best_logit = -INFINITY;
            for (size_t i = 0; i < arr.size; ++i) {
                if (arr.data[i].logit > best_logit) {
                    best_logit = arr.data[i].logit;
                    best = arr.data[i].id;
                }
            }
            return best;
        }
        if (p.top_k > 0) {
            llama_sample_top_k(ctx, &arr, p.top_k, 1);
        }
        if (p.typical_p < 1.0f) {
            llama_sample_typical(ctx, &arr, p.typical_p, 1);
        }
        if (p.top_p < 1.0f) {
            llama_sample_top_p(ctx, &arr, p.top_p, 1);
        }
        if (p.min_p > 0.0f) {
            llama_sample_min_p(ctx, &arr, p.min_p, 1);
        }
        float max_l = -INFINITY;
        for (size_t i = 0; i < arr.size; ++i) {
            max_l = std::max(max_l, arr.data[i].logit);
        }
        if (max_l == -INFINITY) {
            return -1;
        }
        std::vector<double> w(arr.size);
        for (size_t i = 0; i < arr.size; ++i) {
            w[i] = std::exp(static_cast<double>(arr.data[i].logit - max_l) / p.temperature);
        }
        std::discrete_distribution<size_t> dist(w.begin(), w.end());
        return arr.data[dist(rng)].id;
    }

    bool grammar_allows(llama_context * ctx, int32_t tok, float logit) const {
        llama_token_data one{tok, logit, 0.0f};
        llama_token_data_array arr{&one, 1, -1, false};
        llama_grammar_sample(grammar, ctx, &arr);
        return arr.data[0].logit != -INFINITY;
    }
};

SeqSampler::SeqSampler(llama_model * model, const SamplingParams & p, const std::vector<int32_t> & history)
    : impl_(std::make_unique<Impl>()) {
    Impl & s = *impl_;
    s.p = p;
    s.vocab = llama_model_get_vocab(model);
    s.n_vocab = llama_vocab_n_tokens(s.vocab);
    if (!std::isfinite(p.repeat_penalty) || p.repeat_penalty <= 0.0f || !std::isfinite(1.0f / p.repeat_penalty)) {
        throw std::invalid_argument("penalty_repeat must be finite and greater than 0");
    }
    if (!std::isfinite(p.frequency_penalty) || !std::isfinite(p.presence_penalty)) {
        throw std::invalid_argument("penalty_freq and penalty_present must be finite");
    }
    for (const auto & [tok, b] : p.logit_bias) {
        if (tok < 0 || tok >= s.n_vocab) {
            throw std::invalid_argument("logit_bias token id " + std::to_string(tok) + " is outside the vocabulary");
        }
        s.bias.emplace_back(tok, b);
    }
    if (p.ignore_eos) {
        for (int32_t t = 0; t < s.n_vocab; ++t) {
            if (llama_vocab_is_eog(s.vocab, t)) {
                s.bias.emplace_back(t, -INFINITY);
            }
        }
    }
    // Plain greedy decoding (no grammar, bias or penalties) is an argmax over the logits row.
    if (p.temperature <= 0.0f && p.grammar.empty() && p.logit_bias.empty() && p.repeat_penalty == 1.0f &&
        p.presence_penalty == 0.0f && p.frequency_penalty == 0.0f) {
        s.plain_greedy = true;
        s.banned.assign(static_cast<size_t>(s.n_vocab), 0);
        for (const auto & [tok, b] : s.bias) {
            s.banned[tok] = 1;
        }
        return;
    }
    const bool penalized = p.repeat_penalty != 1.0f || p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f;
    s.window = penalized ? static_cast<size_t>(std::max(p.repeat_last_n, 0)) : 0;  // negative: off, as upstream
    for (int32_t t : history) {
        s.remember(t);
    }
    s.rng.seed(p.seed == LLAMA_DEFAULT_SEED ? std::random_device{}() : p.seed);
    if (p.grammar.empty()) {
        return;
    }
    if (p.grammar_type < 1 || p.grammar_type > 3) {
        throw std::invalid_argument("grammar_type must be 1 (user), 2 (output format) or 3 (tool calls)");
    }
    if (p.grammar_lazy) {
        std::vector<std::string> patterns;
        std::vector<llama_token> tokens;
        for (const auto & t : p.grammar_triggers) {
            switch (t.type) {
                case COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN:
                    tokens.push_back(t.token);
                    break;
                case COMMON_GRAMMAR_TRIGGER_TYPE_WORD:
                    patterns.push_back(regex_escape(t.value));
                    break;
                case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN:
                    patterns.push_back(t.value);
                    break;
                case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL:
                    patterns.push_back(t.value.empty() ? "^$"
                                                       : (t.value.front() != '^' ? "^" : "") + t.value +
                                                             (t.value.back() != '$' ? "$" : ""));
                    break;
                default:
                    throw std::invalid_argument("unknown grammar trigger type " + std::to_string(t.type));
            }
        }
        std::vector<const char *> patterns_c;
        for (const auto & pat : patterns) {
            patterns_c.push_back(pat.c_str());
        }
        s.grammar = llama_sampler_init_grammar_lazy_patterns(s.vocab, p.grammar.c_str(), "root", patterns_c.data(),
                                                             patterns_c.size(), tokens.data(), tokens.size());
    } else {
        s.grammar = llama_sampler_init_grammar(s.vocab, p.grammar.c_str(), "root");
    }
    if (s.grammar == nullptr) {
        throw std::invalid_argument("invalid sampling parameters or grammar (the GBNF did not parse)");
    }
}

SeqSampler::~SeqSampler() = default;

int32_t SeqSampler::sample_and_accept(llama_context * ctx, int32_t idx) {
    Impl & s = *impl_;
    const float * logits = llama_get_logits_ith(ctx, idx);
    if (s.plain_greedy) {
        const int32_t best = compat::greedy_token(logits, s.n_vocab, s.banned.data());
        if (best < 0) {
            throw EngineError("the model produced no finite logit (NaN weights?)");
        }
        return best;
    }
    llama_token_data_array arr = s.candidates(ctx, logits);
    int32_t tok = s.draw(ctx, arr);
    if (s.grammar != nullptr && (tok < 0 || !s.grammar_allows(ctx, tok, logits[tok]))) {
        arr = s.candidates(ctx, logits);  // draw() filtered and reordered the first copy
        llama_grammar_sample(s.grammar, ctx, &arr);
        tok = s.draw(ctx, arr);
        if (tok < 0) {
            // Nothing left that the grammar allows (it is complete, and end-of-generation is banned):
            // end the sequence without feeding the grammar a token it would abort on.
            return llama_vocab_eos(s.vocab);
        }
    }
    if (tok < 0) {
        throw EngineError("the model produced no finite logit (NaN weights?)");
    }
    if (s.grammar != nullptr) {
        llama_grammar_accept_token(s.grammar, ctx, tok);
    }
    s.remember(tok);
    return tok;
}

}  // namespace PYLOCALAI_ENGINE_NS
