// The engine contract shared by every fork: Model (weights, vocab, chat templates) and Session
// (one llama_context: KV cache, per-sequence samplers, one batched decode per step).
// No Python here; bindings.cpp wraps it. Fork differences live behind compat/compat.hpp.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

struct llama_model;
struct llama_context;
struct llama_vocab;
struct ggml_tensor;

namespace PYLOCALAI_ENGINE_NS {

// Raised for engine failures that are not the caller's fault (load failed, decode error).
struct EngineError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct ModelParams {
    std::string path;
    int32_t n_gpu_layers = -1;  // negative: all layers (a CPU build ignores it)
    int32_t main_gpu = 0;
    std::vector<float> tensor_split;
    bool use_mmap = true;
    bool use_mlock = false;
    bool check_tensors = false;
    bool vocab_only = false;
    std::vector<std::string> rpc_servers;  // host:port of ggml RPC servers

    // ik_llama.cpp only. Unset: the fork's default; the llama.cpp engine rejects any that is set.
    std::optional<bool> repack_tensors;      // run-time repack into row-interleaved types (CPU; -rtr)
    std::optional<bool> use_thp;             // transparent huge pages for the weights (Linux)
    std::optional<bool> merge_qkv;           // merge separate Q, K, V weights into one tensor
    std::optional<bool> merge_up_gate_exps;  // merge MoE up and gate expert weights into one tensor
    std::optional<bool> validate_quants;     // check quantized weights for NaNs at load
    std::optional<int32_t> mla;              // MLA preparation at load (DeepSeek-style models); 3 if unset
    std::optional<int32_t> n_cpu_moe;        // keep the MoE weights of the first N layers in CPU memory
};

struct ContextParams {
    uint32_t n_ctx = 0;  // 0: the model's training context
    uint32_t n_batch = 512;
    uint32_t n_ubatch = 512;
    uint32_t n_seq_max = 1;
    int32_t n_threads = -1;  // -1: hardware concurrency
    int32_t n_threads_batch = -1;
    int32_t flash_attn = -1;  // -1 auto, 0 off, 1 on
    std::string type_k = "f16";
    std::string type_v = "f16";
    bool kv_unified = true;
    bool swa_full = false;
    bool embeddings = false;
    bool offload_kqv = true;
    bool op_offload = true;
    float rope_freq_base = 0.0f;
    float rope_freq_scale = 0.0f;
    // Record which ops each computed graph holds (Session::op_counts): how a knob that only changes
    // the graph (fused ops, merged or repacked weights, split attention) is seen to take effect.
    bool trace_ops = false;

    // ik_llama.cpp only. Unset: the fork's default; the llama.cpp engine rejects any that is set.
    std::optional<int32_t> mla_attn;           // 0 standard attention, 1..3 MLA variants (DeepSeek-style)
    std::optional<int32_t> attn_max_batch;     // max batch of one attention op without flash attention; 0 off
    std::optional<bool> fused_moe_up_gate;     // fused up * act(gate) for MoE experts
    std::optional<bool> fused_up_gate;         // fused up * act(gate) for dense FFNs
    std::optional<bool> fused_mmad;            // fused mul + multi_add
    std::optional<bool> grouped_expert_routing;
    std::optional<bool> rope_cache;
    std::optional<bool> graph_reuse;           // reuse the compute graph between similar decodes
    std::optional<int32_t> min_experts;        // smart expert reduction: at least this many experts...
    std::optional<float> thresh_experts;       // ...then drop experts below this share of the top one
    std::optional<bool> only_active_experts;   // hybrid CPU/GPU: upload only the experts a batch uses
    std::optional<bool> k_cache_hadamard;      // Hadamard transform on the K cache (quantized caches)
    std::optional<bool> v_cache_hadamard;      // Hadamard transform on the V cache (needs flash attention)
};

struct GrammarTrigger {
    int32_t type = 0;  // 0 token, 1 word, 2 pattern, 3 full pattern (common_grammar_trigger_type)
    std::string value;
    int32_t token = -1;
};

struct SamplingParams {
    float temperature = 0.8f;
    int32_t top_k = 40;
    float top_p = 0.95f;
    float min_p = 0.05f;
    float typical_p = 1.0f;
    float repeat_penalty = 1.0f;
    float presence_penalty = 0.0f;
    float frequency_penalty = 0.0f;
    int32_t repeat_last_n = 64;
    uint32_t seed = 0xFFFFFFFF;  // LLAMA_DEFAULT_SEED: random
    std::vector<std::pair<int32_t, float>> logit_bias;
    std::string grammar;  // GBNF; empty: none
    // 1 user grammar; 2 output format, 3 tool calls: both start after the template's generation
    // prompt, which is fed to the grammar first (common_grammar_type)
    int32_t grammar_type = 1;
    std::string generation_prompt;
    bool grammar_lazy = false;
    std::vector<GrammarTrigger> grammar_triggers;
    std::vector<int32_t> preserved_tokens;  // special tokens rendered as text (tool-call markers)
    bool ignore_eos = false;
    int32_t n_probs = 0;  // >0: report logprobs with this many alternatives
    // Stop strings (UTF-8). The caller cuts the text; the engine only watches for them so that
    // Session::run ends its steps where one appears.
    std::vector<std::string> stop;
};

struct ModelInfo {
    std::string architecture;
    std::string description;
    int32_t n_ctx_train = 0;
    int32_t n_vocab = 0;
    int32_t n_embd = 0;
    int32_t n_layer = 0;
    uint64_t n_params = 0;
    uint64_t size_bytes = 0;
    int32_t bos = -1;
    int32_t eos = -1;
    int32_t eot = -1;
    bool add_bos = false;
    std::vector<int32_t> eog_tokens;
    std::string chat_template;
    bool recurrent = false;  // state cannot be cut back to a prefix
    bool hybrid = false;
    bool has_encoder = false;
    int32_t pooling = -1;
    std::map<std::string, std::string> metadata;
};

// Result of applying the model's chat template (llama.cpp's own chat library).
struct ChatPrompt {
    std::string prompt;
    std::string grammar;
    bool grammar_lazy = false;
    std::vector<GrammarTrigger> grammar_triggers;
    std::vector<std::string> preserved_tokens;
    std::vector<std::string> additional_stops;
    int32_t format = 0;
    std::string format_name;
    std::string generation_prompt;
    std::string parser;  // serialized PEG parser for chat_parse
    bool supports_thinking = false;
    std::string thinking_start_tag;
    std::vector<std::string> thinking_end_tags;
};

struct ChatOptions {
    std::string messages_json;  // OpenAI-style messages array
    std::string tools_json;     // OpenAI-style tools array, or empty
    std::string tool_choice = "auto";  // auto | required | none
    bool parallel_tool_calls = false;
    bool add_generation_prompt = true;
    bool enable_thinking = true;
    std::string json_schema;  // response format schema, or empty
    std::string grammar;      // user GBNF, or empty
    std::string template_override;
    std::map<std::string, std::string> template_kwargs;  // values are JSON
};

struct ChatParseOptions {
    int32_t format = 0;
    std::string parser;
    std::string generation_prompt;
    bool parse_tool_calls = true;
    bool reasoning = false;  // split reasoning_content out (deepseek style)
    bool is_partial = false;
};

class Model {
public:
    explicit Model(const ModelParams & params);
    ~Model();
    Model(const Model &) = delete;
    Model & operator=(const Model &) = delete;

    llama_model * raw() const { return model_; }
    const llama_vocab * vocab() const { return vocab_; }
    const ModelInfo & info() const { return info_; }

    std::vector<int32_t> tokenize(const std::string & text, bool add_special, bool parse_special) const;
    std::string token_to_piece(int32_t token, bool special) const;
    std::string piece(int32_t token, bool special) const;  // token_to_piece without the range check (hot path)
    std::string detokenize(const std::vector<int32_t> & tokens, bool remove_special, bool unparse_special) const;
    bool is_eog(int32_t token) const;

    ChatPrompt chat_apply(const ChatOptions & opts) const;
    std::string chat_parse(const std::string & text, const ChatParseOptions & opts) const;  // JSON message

private:
    llama_model * model_ = nullptr;
    const llama_vocab * vocab_ = nullptr;
    ModelInfo info_;
};

std::string json_schema_to_gbnf(const std::string & schema_json);
std::vector<std::string> cache_type_names();

// Output of one step: one row per sequence that asked for a sample.
struct StepOutput {
    int32_t status = 0;  // 0 ok; 1 no KV space for this batch (nothing was decoded)
    std::vector<int32_t> seq_ids;
    std::vector<int32_t> tokens;
    std::vector<uint8_t> eog;
    std::vector<std::string> pieces;  // UTF-8 bytes, possibly a partial character
    std::vector<float> logprobs;      // of the sampled token (0 when not asked)
    std::vector<std::vector<std::pair<int32_t, float>>> top;  // alternatives, when asked
    std::vector<uint8_t> stopped;     // a stop string of the row's sequence ends in its recent bytes
    int32_t steps = 0;                // decode steps these rows came from (Session::run)
    std::string error;                // Session::run: why a step after the first failed (rows before it stand)
};

class SeqSampler;  // per-fork, compat layer

class Session {
public:
    Session(std::shared_ptr<Model> model, const ContextParams & params);
    ~Session();
    Session(const Session &) = delete;
    Session & operator=(const Session &) = delete;

    uint32_t n_ctx() const;
    uint32_t n_ctx_seq() const;
    uint32_t n_batch() const;
    uint32_t n_seq_max() const;
    llama_context * raw() const { return ctx_; }

    // A fresh sampler for seq; history holds tokens already in the sequence (penalties see them).
    void set_sampler(int32_t seq, const SamplingParams & params, const std::vector<int32_t> & history);
    void drop_sampler(int32_t seq);

    // One llama_decode over the whole batch, then one sample per row whose want_sample is set.
    StepOutput step(const std::vector<int32_t> & tokens, const std::vector<int32_t> & pos,
                    const std::vector<int32_t> & seq_ids, const std::vector<uint8_t> & want_sample);

    // Up to max_steps steps of sequences that are all generating: each step decodes every
    // sequence's last sampled token (tokens[i] at pos[i] first) and samples its next, with no
    // return to the caller in between. The steps end early, after the step where any sequence
    // samples an end-of-generation token (where stop_on_eog[i]), has used its remaining[i] tokens,
    // or sees a stop string, and before a step once interrupt() was called. Rows come step by step,
    // one per sequence in seq_ids order; `steps` says how many. status 1: no KV room for the first
    // step. A later step that finds no room ends the run with the steps before it; one that fails
    // ends it too, with `error` set (a failure of the first step is thrown).
    StepOutput run(std::vector<int32_t> tokens, std::vector<int32_t> pos, const std::vector<int32_t> & seq_ids,
                   std::vector<int32_t> remaining, const std::vector<uint8_t> & stop_on_eog, int32_t max_steps);
    // Any thread: the running (or next) run() stops before its next step.
    void interrupt() { interrupt_.store(true, std::memory_order_release); }
    void clear_interrupt() { interrupt_.store(false, std::memory_order_release); }

    // KV / state memory of one sequence.
    bool seq_rm(int32_t seq, int32_t p0, int32_t p1);
    void seq_cp(int32_t src, int32_t dst, int32_t p0, int32_t p1);
    void seq_keep(int32_t seq);
    void seq_add(int32_t seq, int32_t p0, int32_t p1, int32_t delta);  // shift positions (context shift)
    int32_t seq_pos_max(int32_t seq) const;
    int32_t seq_pos_min(int32_t seq) const;
    int32_t n_swa() const;
    bool checkpoints_supported() const;
    std::vector<uint8_t> checkpoint_save(int32_t seq, bool partial);
    bool checkpoint_load(int32_t seq, const uint8_t * data, size_t size, bool partial);
    void clear();
    bool can_shift() const;
    int32_t graphs_reused() const;

    // Pooled embedding of one token sequence (context made with embeddings=true).
    std::vector<float> embed(const std::vector<int32_t> & tokens, bool normalize);

    // With ContextParams::trace_ops: how often each op ran since the last reset, keyed by op name;
    // matrix products also name the weight type ("MUL_MAT:q4_0_r8").
    std::map<std::string, int64_t> op_counts() const;
    // ...and the names of the weight tensors ("*.weight") those ops read.
    std::set<std::string> weights_used() const;
    void reset_op_counts();

private:
    static bool trace_op(struct ggml_tensor * t, bool ask, void * self);

    mutable std::mutex trace_mu_;
    std::map<std::string, int64_t> op_counts_;
    std::set<std::string> weights_used_;
    std::shared_ptr<Model> model_;
    llama_context * ctx_ = nullptr;
    std::map<int32_t, std::unique_ptr<SeqSampler>> samplers_;
    std::map<int32_t, int32_t> n_probs_;
    std::map<int32_t, std::vector<int32_t>> preserved_;
    struct StopWatch {
        std::vector<std::string> stops;
        size_t keep = 0;   // bytes of the recent text kept: the longest stop string less one
        std::string tail;  // the sequence's last `keep` bytes of text
    };
    std::map<int32_t, StopWatch> stop_watch_;  // sequences that have stop strings
    bool watch_stops(int32_t seq, const std::string & piece);
    std::atomic<bool> interrupt_{false};
    uint32_t n_ctx_seq_ = 0;
    uint32_t n_seq_max_ = 0;
};

}  // namespace PYLOCALAI_ENGINE_NS
