// PYBIND11_MODULE for one engine. Built once per fork with its own namespace and module name;
// every class is module_local so that two engine modules in one process never share types.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <unistd.h>

#include <string_view>

#include "compat/compat.hpp"
#include "engine_api.hpp"
#include "llama.h"
#ifdef PYLOCALAI_HAS_MTMD
#include "multimodal.hpp"
#endif

namespace py = pybind11;

namespace PYLOCALAI_ENGINE_NS {
namespace {

template <typename T>
T get_or(const py::dict & d, const char * key, T fallback) {
    if (d.contains(key) && !d[key].is_none()) {
        return d[key].cast<T>();
    }
    return fallback;
}

template <typename T>
std::optional<T> get_opt(const py::dict & d, const char * key) {
    if (d.contains(key) && !d[key].is_none()) {
        return d[key].cast<T>();
    }
    return std::nullopt;
}

void reject_unknown(const py::dict & d, std::initializer_list<const char *> known, const char * what) {
    for (const auto & item : d) {
        const auto key = item.first.cast<std::string>();
        bool ok = false;
        for (const char * k : known) {
            ok = ok || key == k;
        }
        if (!ok) {
            throw std::invalid_argument(std::string("unknown ") + what + " parameter '" + key + "'");
        }
    }
}

ModelParams model_params_from(const std::string & path, const py::dict & d) {
    reject_unknown(d, {"n_gpu_layers", "main_gpu", "tensor_split", "use_mmap", "use_mlock", "check_tensors",
                       "vocab_only", "rpc_servers", "repack_tensors", "use_thp", "merge_qkv", "merge_up_gate_exps",
                       "validate_quants", "mla", "n_cpu_moe"}, "model");
    ModelParams p;
    p.path = path;
    p.n_gpu_layers = get_or(d, "n_gpu_layers", p.n_gpu_layers);
    p.main_gpu = get_or(d, "main_gpu", p.main_gpu);
    p.tensor_split = get_or(d, "tensor_split", p.tensor_split);
    p.use_mmap = get_or(d, "use_mmap", p.use_mmap);
    p.use_mlock = get_or(d, "use_mlock", p.use_mlock);
    p.check_tensors = get_or(d, "check_tensors", p.check_tensors);
    p.vocab_only = get_or(d, "vocab_only", p.vocab_only);
    p.rpc_servers = get_or(d, "rpc_servers", p.rpc_servers);
    p.repack_tensors = get_opt<bool>(d, "repack_tensors");
    p.use_thp = get_opt<bool>(d, "use_thp");
    p.merge_qkv = get_opt<bool>(d, "merge_qkv");
    p.merge_up_gate_exps = get_opt<bool>(d, "merge_up_gate_exps");
    p.validate_quants = get_opt<bool>(d, "validate_quants");
    p.mla = get_opt<int32_t>(d, "mla");
    p.n_cpu_moe = get_opt<int32_t>(d, "n_cpu_moe");
    return p;
}

ContextParams context_params_from(const py::dict & d) {
    reject_unknown(d, {"n_ctx", "n_batch", "n_ubatch", "n_seq_max", "n_threads", "n_threads_batch", "flash_attn",
                       "type_k", "type_v", "kv_unified", "swa_full", "embeddings", "offload_kqv", "op_offload",
                       "rope_freq_base", "rope_freq_scale", "trace_ops", "mla_attn", "attn_max_batch", "fused_moe_up_gate",
                       "fused_up_gate", "fused_mmad", "grouped_expert_routing", "rope_cache", "graph_reuse",
                       "min_experts", "thresh_experts", "only_active_experts", "k_cache_hadamard",
                       "v_cache_hadamard"}, "context");
    ContextParams p;
    p.n_ctx = get_or(d, "n_ctx", p.n_ctx);
    p.n_batch = get_or(d, "n_batch", p.n_batch);
    p.n_ubatch = get_or(d, "n_ubatch", p.n_ubatch);
    p.n_seq_max = get_or(d, "n_seq_max", p.n_seq_max);
    p.n_threads = get_or(d, "n_threads", p.n_threads);
    p.n_threads_batch = get_or(d, "n_threads_batch", p.n_threads_batch);
    p.flash_attn = get_or(d, "flash_attn", p.flash_attn);
    p.type_k = get_or(d, "type_k", p.type_k);
    p.type_v = get_or(d, "type_v", p.type_v);
    p.kv_unified = get_or(d, "kv_unified", p.kv_unified);
    p.swa_full = get_or(d, "swa_full", p.swa_full);
    p.embeddings = get_or(d, "embeddings", p.embeddings);
    p.offload_kqv = get_or(d, "offload_kqv", p.offload_kqv);
    p.op_offload = get_or(d, "op_offload", p.op_offload);
    p.rope_freq_base = get_or(d, "rope_freq_base", p.rope_freq_base);
    p.rope_freq_scale = get_or(d, "rope_freq_scale", p.rope_freq_scale);
    p.trace_ops = get_or(d, "trace_ops", p.trace_ops);
    p.mla_attn = get_opt<int32_t>(d, "mla_attn");
    p.attn_max_batch = get_opt<int32_t>(d, "attn_max_batch");
    p.fused_moe_up_gate = get_opt<bool>(d, "fused_moe_up_gate");
    p.fused_up_gate = get_opt<bool>(d, "fused_up_gate");
    p.fused_mmad = get_opt<bool>(d, "fused_mmad");
    p.grouped_expert_routing = get_opt<bool>(d, "grouped_expert_routing");
    p.rope_cache = get_opt<bool>(d, "rope_cache");
    p.graph_reuse = get_opt<bool>(d, "graph_reuse");
    p.min_experts = get_opt<int32_t>(d, "min_experts");
    p.thresh_experts = get_opt<float>(d, "thresh_experts");
    p.only_active_experts = get_opt<bool>(d, "only_active_experts");
    p.k_cache_hadamard = get_opt<bool>(d, "k_cache_hadamard");
    p.v_cache_hadamard = get_opt<bool>(d, "v_cache_hadamard");
    return p;
}

// Wake the consumer that waits for the previous step's events, from a native step once it has
// released the GIL: woken from Python, it took the GIL and stalled the engine thread.
void notify(int fd) {
    if (fd >= 0) {
        const uint64_t one = 1;
        [[maybe_unused]] const auto n = ::write(fd, &one, sizeof one);
    }
}

// A step's sampled rows: (seq, token, eog, piece bytes, logprob, top alternatives).
py::list step_rows(const StepOutput & out) {
    py::list rows;
    for (size_t i = 0; i < out.tokens.size(); ++i) {
        rows.append(py::make_tuple(out.seq_ids[i], out.tokens[i], static_cast<bool>(out.eog[i]),
                                   py::bytes(out.pieces[i]), out.logprobs[i], py::cast(out.top[i])));
    }
    return rows;
}

SamplingParams sampling_params_from(const py::dict & d) {
    reject_unknown(d, {"temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
                       "frequency_penalty", "repeat_last_n", "seed", "logit_bias", "grammar", "grammar_type",
                       "generation_prompt", "grammar_lazy",
                       "grammar_triggers", "preserved_tokens", "ignore_eos", "n_probs", "stop"}, "sampling");
    SamplingParams p;
    p.temperature = get_or(d, "temperature", p.temperature);
    p.top_k = get_or(d, "top_k", p.top_k);
    p.top_p = get_or(d, "top_p", p.top_p);
    p.min_p = get_or(d, "min_p", p.min_p);
    p.typical_p = get_or(d, "typical_p", p.typical_p);
    p.repeat_penalty = get_or(d, "repeat_penalty", p.repeat_penalty);
    p.presence_penalty = get_or(d, "presence_penalty", p.presence_penalty);
    p.frequency_penalty = get_or(d, "frequency_penalty", p.frequency_penalty);
    p.repeat_last_n = get_or(d, "repeat_last_n", p.repeat_last_n);
    if (d.contains("seed") && !d["seed"].is_none()) {
        p.seed = static_cast<uint32_t>(d["seed"].cast<int64_t>() & 0xFFFFFFFF);
    }
    p.logit_bias = get_or(d, "logit_bias", p.logit_bias);
    p.grammar = get_or(d, "grammar", p.grammar);
    p.grammar_type = get_or(d, "grammar_type", p.grammar_type);
    p.generation_prompt = get_or(d, "generation_prompt", p.generation_prompt);
    p.grammar_lazy = get_or(d, "grammar_lazy", p.grammar_lazy);
    if (d.contains("grammar_triggers") && !d["grammar_triggers"].is_none()) {
        for (const auto & t : d["grammar_triggers"].cast<std::vector<std::tuple<int32_t, std::string, int32_t>>>()) {
            p.grammar_triggers.push_back({std::get<0>(t), std::get<1>(t), std::get<2>(t)});
        }
    }
    p.preserved_tokens = get_or(d, "preserved_tokens", p.preserved_tokens);
    p.ignore_eos = get_or(d, "ignore_eos", p.ignore_eos);
    p.n_probs = get_or(d, "n_probs", p.n_probs);
    p.stop = get_or(d, "stop", p.stop);
    return p;
}

py::dict info_to_dict(const ModelInfo & i) {
    py::dict d;
    d["architecture"] = i.architecture;
    d["description"] = i.description;
    d["n_ctx_train"] = i.n_ctx_train;
    d["n_vocab"] = i.n_vocab;
    d["n_embd"] = i.n_embd;
    d["n_layer"] = i.n_layer;
    d["n_params"] = i.n_params;
    d["size_bytes"] = i.size_bytes;
    d["bos"] = i.bos;
    d["eos"] = i.eos;
    d["eot"] = i.eot;
    d["add_bos"] = i.add_bos;
    d["eog_tokens"] = i.eog_tokens;
    d["chat_template"] = i.chat_template;
    d["recurrent"] = i.recurrent;
    d["hybrid"] = i.hybrid;
    d["has_encoder"] = i.has_encoder;
    d["metadata"] = i.metadata;
    return d;
}

py::dict chat_prompt_to_dict(const ChatPrompt & c) {
    py::dict d;
    d["prompt"] = py::bytes(c.prompt).attr("decode")("utf-8", "replace");
    d["grammar"] = c.grammar;
    d["grammar_lazy"] = c.grammar_lazy;
    py::list triggers;
    for (const auto & t : c.grammar_triggers) {
        triggers.append(py::make_tuple(t.type, t.value, t.token));
    }
    d["grammar_triggers"] = triggers;
    d["preserved_tokens"] = c.preserved_tokens;
    d["additional_stops"] = c.additional_stops;
    d["format"] = c.format;
    d["format_name"] = c.format_name;
    d["generation_prompt"] = c.generation_prompt;
    d["parser"] = py::bytes(c.parser);
    d["supports_thinking"] = c.supports_thinking;
    d["thinking_start_tag"] = c.thinking_start_tag;
    d["thinking_end_tags"] = c.thinking_end_tags;
    return d;
}

std::vector<int32_t> as_tokens(const py::array_t<int32_t, py::array::c_style | py::array::forcecast> & a) {
    return std::vector<int32_t>(a.data(), a.data() + a.size());
}

}  // namespace

void register_model(py::module_ & m) {
    py::class_<Model, std::shared_ptr<Model>>(m, "Model", py::module_local())
        .def(py::init([](const std::string & path, const py::dict & params) {
                 ModelParams p = model_params_from(path, params);
                 py::gil_scoped_release release;
                 return std::make_shared<Model>(p);
             }),
             py::arg("path"), py::arg("params") = py::dict())
        .def_property_readonly("info", [](const Model & m) { return info_to_dict(m.info()); })
        .def("tokenize",
             [](const Model & m, const std::string & text, bool add_special, bool parse_special) {
                 std::vector<int32_t> out;
                 {
                     py::gil_scoped_release release;
                     out = m.tokenize(text, add_special, parse_special);
                 }
                 return py::array_t<int32_t>(static_cast<py::ssize_t>(out.size()), out.data());
             },
             py::arg("text"), py::arg("add_special") = true, py::arg("parse_special") = true)
        .def("token_to_piece",
             [](const Model & m, int32_t token, bool special) { return py::bytes(m.token_to_piece(token, special)); },
             py::arg("token"), py::arg("special") = false)
        .def("detokenize",
             [](const Model & m, const py::array_t<int32_t, py::array::c_style | py::array::forcecast> & toks,
                bool remove_special, bool unparse_special) {
                 return py::bytes(m.detokenize(as_tokens(toks), remove_special, unparse_special));
             },
             py::arg("tokens"), py::arg("remove_special") = false, py::arg("unparse_special") = false)
        .def("is_eog", &Model::is_eog)
        .def("chat_apply",
             [](const Model & m, const std::string & messages_json, const std::string & tools_json,
                const std::string & tool_choice, bool parallel_tool_calls, bool add_generation_prompt,
                bool enable_thinking, const std::string & json_schema, const std::string & grammar,
                const std::string & template_override, const std::map<std::string, std::string> & kwargs) {
                 ChatOptions o;
                 o.messages_json = messages_json;
                 o.tools_json = tools_json;
                 o.tool_choice = tool_choice;
                 o.parallel_tool_calls = parallel_tool_calls;
                 o.add_generation_prompt = add_generation_prompt;
                 o.enable_thinking = enable_thinking;
                 o.json_schema = json_schema;
                 o.grammar = grammar;
                 o.template_override = template_override;
                 o.template_kwargs = kwargs;
                 ChatPrompt c;
                 {
                     py::gil_scoped_release release;
                     c = m.chat_apply(o);
                 }
                 return chat_prompt_to_dict(c);
             },
             py::arg("messages_json"), py::arg("tools_json") = "", py::arg("tool_choice") = "auto",
             py::arg("parallel_tool_calls") = false, py::arg("add_generation_prompt") = true,
             py::arg("enable_thinking") = true, py::arg("json_schema") = "", py::arg("grammar") = "",
             py::arg("template_override") = "", py::arg("template_kwargs") = std::map<std::string, std::string>())
        .def("chat_parse",
             [](const Model & m, const std::string & text, int32_t format, const py::bytes & parser,
                const std::string & generation_prompt, bool parse_tool_calls, bool reasoning, bool is_partial) {
                 ChatParseOptions o;
                 o.format = format;
                 o.parser = parser.cast<std::string>();
                 o.generation_prompt = generation_prompt;
                 o.parse_tool_calls = parse_tool_calls;
                 o.reasoning = reasoning;
                 o.is_partial = is_partial;
                 std::string js;
                 {
                     py::gil_scoped_release release;
                     js = m.chat_parse(text, o);
                 }
                 return js;
             },
             py::arg("text"), py::arg("format"), py::arg("parser") = py::bytes(), py::arg("generation_prompt") = "",
             py::arg("parse_tool_calls") = true, py::arg("reasoning") = false, py::arg("is_partial") = false);
}

void register_session(py::module_ & m) {
    py::class_<Session>(m, "Session", py::module_local())
        .def(py::init([](std::shared_ptr<Model> model, const py::dict & params) {
                 ContextParams p = context_params_from(params);
                 py::gil_scoped_release release;
                 return std::make_unique<Session>(std::move(model), p);
             }),
             py::arg("model").none(false), py::arg("params") = py::dict())
        .def_property_readonly("n_ctx", &Session::n_ctx)
        .def_property_readonly("n_ctx_seq", &Session::n_ctx_seq)
        .def_property_readonly("n_batch", &Session::n_batch)
        .def_property_readonly("n_seq_max", &Session::n_seq_max)
        .def("set_sampler",
             [](Session & s, int32_t seq, const py::dict & params,
                const py::array_t<int32_t, py::array::c_style | py::array::forcecast> & history) {
                 SamplingParams p = sampling_params_from(params);
                 std::vector<int32_t> h = as_tokens(history);
                 py::gil_scoped_release release;  // grammar parsing can take a while
                 s.set_sampler(seq, p, h);
             },
             py::arg("seq"), py::arg("params"), py::arg("history"))
        .def("drop_sampler", &Session::drop_sampler)
        .def("step",
             [](Session & s, const py::array_t<int32_t, py::array::c_style | py::array::forcecast> & tokens,
                const py::array_t<int32_t, py::array::c_style | py::array::forcecast> & pos,
                const py::array_t<int32_t, py::array::c_style | py::array::forcecast> & seq_ids,
                const py::array_t<uint8_t, py::array::c_style | py::array::forcecast> & want, int notify_fd) {
                 std::vector<int32_t> t = as_tokens(tokens);
                 std::vector<int32_t> p = as_tokens(pos);
                 std::vector<int32_t> q = as_tokens(seq_ids);
                 std::vector<uint8_t> w(want.data(), want.data() + want.size());
                 StepOutput out;
                 {
                     py::gil_scoped_release release;  // decode + sample for the whole batch
                     notify(notify_fd);
                     out = s.step(t, p, q, w);
                 }
                 return py::make_tuple(out.status, step_rows(out));
             },
             py::arg("tokens"), py::arg("pos"), py::arg("seq_ids"), py::arg("want_sample"), py::arg("notify_fd") = -1)
        .def("run",
             [](Session & s, const py::array_t<int32_t, py::array::c_style | py::array::forcecast> & tokens,
                const py::array_t<int32_t, py::array::c_style | py::array::forcecast> & pos,
                const py::array_t<int32_t, py::array::c_style | py::array::forcecast> & seq_ids,
                const py::array_t<int32_t, py::array::c_style | py::array::forcecast> & remaining,
                const py::array_t<uint8_t, py::array::c_style | py::array::forcecast> & stop_on_eog, int32_t max_steps,
                int notify_fd) {
                 std::vector<int32_t> t = as_tokens(tokens);
                 std::vector<int32_t> p = as_tokens(pos);
                 std::vector<int32_t> q = as_tokens(seq_ids);
                 std::vector<int32_t> r = as_tokens(remaining);
                 std::vector<uint8_t> e(stop_on_eog.data(), stop_on_eog.data() + stop_on_eog.size());
                 StepOutput out;
                 {
                     py::gil_scoped_release release;  // every step, decode + sample
                     notify(notify_fd);
                     out = s.run(std::move(t), std::move(p), q, std::move(r), e, max_steps);
                 }
                 return py::make_tuple(out.status, out.steps, step_rows(out),
                                       out.error.empty() ? py::object(py::none()) : py::object(py::str(out.error)));
             },
             py::arg("tokens"), py::arg("pos"), py::arg("seq_ids"), py::arg("remaining"), py::arg("stop_on_eog"),
             py::arg("max_steps"), py::arg("notify_fd") = -1)
        .def("interrupt", &Session::interrupt)
        .def("clear_interrupt", &Session::clear_interrupt)
        .def("seq_rm", &Session::seq_rm)
        .def("seq_cp", &Session::seq_cp)
        .def("seq_keep", &Session::seq_keep)
        .def("seq_add", &Session::seq_add)
        .def("seq_pos_max", &Session::seq_pos_max)
        .def("seq_pos_min", &Session::seq_pos_min)
        .def_property_readonly("n_swa", &Session::n_swa)
        .def_property_readonly("checkpoints_supported", &Session::checkpoints_supported)
        .def("checkpoint_save",
             [](Session & s, int32_t seq, bool partial) {
                 std::vector<uint8_t> data;
                 {
                     py::gil_scoped_release release;
                     data = s.checkpoint_save(seq, partial);
                 }
                 return py::bytes(reinterpret_cast<const char *>(data.data()), data.size());
             },
             py::arg("seq"), py::arg("partial") = true)
        .def("checkpoint_load",
             [](Session & s, int32_t seq, const py::bytes & data, bool partial) {
                 const auto view = static_cast<std::string_view>(data);
                 py::gil_scoped_release release;
                 return s.checkpoint_load(seq, reinterpret_cast<const uint8_t *>(view.data()), view.size(), partial);
             },
             py::arg("seq"), py::arg("data"), py::arg("partial") = true)
        .def("clear", &Session::clear)
        .def("op_counts", &Session::op_counts)
        .def("weights_used", &Session::weights_used)
        .def("reset_op_counts", &Session::reset_op_counts)
        .def("can_shift", &Session::can_shift)
        .def_property_readonly("graphs_reused", &Session::graphs_reused)
        .def("embed",
             [](Session & s, const py::array_t<int32_t, py::array::c_style | py::array::forcecast> & tokens,
                bool normalize) {
                 std::vector<int32_t> t = as_tokens(tokens);
                 std::vector<float> e;
                 {
                     py::gil_scoped_release release;
                     e = s.embed(t, normalize);
                 }
                 return py::array_t<float>(static_cast<py::ssize_t>(e.size()), e.data());
             },
             py::arg("tokens"), py::arg("normalize") = true);
}

#ifdef PYLOCALAI_HAS_MTMD
void register_projector(py::module_ & m) {
    py::class_<MediaChunk, std::shared_ptr<MediaChunk>>(m, "MediaChunk", py::module_local())
        .def_readonly("n_tokens", &MediaChunk::n_tokens)
        .def_readonly("n_pos", &MediaChunk::n_pos)
        .def_readonly("id", &MediaChunk::id)
        .def_readonly("audio", &MediaChunk::audio);
    py::class_<Projector>(m, "Projector", py::module_local())
        .def(py::init([](std::shared_ptr<Model> model, const std::string & path, const py::dict & d) {
                 reject_unknown(d, {"use_gpu", "n_threads", "image_min_tokens", "image_max_tokens", "warmup"},
                                "projector");
                 ProjectorParams p;
                 p.path = path;
                 p.use_gpu = get_or(d, "use_gpu", p.use_gpu);
                 p.n_threads = get_or(d, "n_threads", p.n_threads);
                 p.image_min_tokens = get_or(d, "image_min_tokens", p.image_min_tokens);
                 p.image_max_tokens = get_or(d, "image_max_tokens", p.image_max_tokens);
                 p.warmup = get_or(d, "warmup", p.warmup);
                 py::gil_scoped_release release;
                 return std::make_unique<Projector>(std::move(model), p);
             }),
             py::arg("model").none(false), py::arg("path"), py::arg("params") = py::dict())
        .def_property_readonly("vision", &Projector::vision)
        .def_property_readonly("audio", &Projector::audio)
        .def_property_readonly("marker", &Projector::marker)
        .def("tokenize",
             [](const Projector & pr, const std::string & prompt, const std::vector<py::bytes> & files,
                bool add_special, bool parse_special) {
                 std::vector<std::string> f;
                 f.reserve(files.size());
                 for (const auto & b : files) {
                     f.push_back(b.cast<std::string>());
                 }
                 std::vector<MediaSegment> segs;
                 {
                     py::gil_scoped_release release;  // decoding and resizing images
                     segs = pr.tokenize(prompt, f, add_special, parse_special);
                 }
                 py::list out;
                 for (const auto & s : segs) {
                     if (s.media) {
                         out.append(py::cast(s.media));
                     } else {
                         out.append(py::array_t<int32_t>(static_cast<py::ssize_t>(s.tokens.size()), s.tokens.data()));
                     }
                 }
                 return out;
             },
             py::arg("prompt"), py::arg("files"), py::arg("add_special") = true, py::arg("parse_special") = true)
        .def("eval",
             [](Projector & pr, Session & session, const MediaChunk & media, int32_t seq, int32_t pos) {
                 py::gil_scoped_release release;  // the vision/audio encoder, then one decode
                 return pr.eval(session, media, seq, pos);
             },
             py::arg("session"), py::arg("media"), py::arg("seq"), py::arg("pos"));
}
#endif

}  // namespace PYLOCALAI_ENGINE_NS

PYBIND11_MODULE(PYLOCALAI_ENGINE_MODULE, m) {
    namespace ns = PYLOCALAI_ENGINE_NS;
    m.doc() = "pylocalai engine binding for " PYLOCALAI_ENGINE_NAME;
    m.attr("ENGINE") = PYLOCALAI_ENGINE_NAME;
    py::register_local_exception<ns::EngineError>(m, "EngineError", PyExc_RuntimeError);
    ns::compat::backend_init();
    ns::register_model(m);
    ns::register_session(m);
#ifdef PYLOCALAI_HAS_MTMD
    ns::register_projector(m);
#endif
    m.def("json_schema_to_grammar", [](const std::string & schema) {
        py::gil_scoped_release release;
        return ns::json_schema_to_gbnf(schema);
    });
    m.def("cache_type_names", &ns::cache_type_names);
    m.def("system_info", [] { return std::string(llama_print_system_info()); });
    m.def("supports_gpu_offload", [] { return llama_supports_gpu_offload(); });
    m.def("backends", &ns::compat::backend_names);
}
