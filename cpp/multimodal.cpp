// Projector: libmtmd behind the engine contract (see multimodal.hpp).
// ik_llama.cpp carries an older libmtmd (examples/mtmd): the few calls that differ are marked
// PYLOCALAI_ENGINE_IK here rather than in the compat layer, which builds without mtmd's headers.
#include "multimodal.hpp"

#include <stdexcept>

#include "compat/compat.hpp"
#include "llama.h"
#include "mtmd-helper.h"
#include "mtmd.h"
#ifdef PYLOCALAI_ENGINE_IK
#include "clip-impl.h"  // g_logger_state: ik's libmtmd has no log-callback setter
#endif

namespace PYLOCALAI_ENGINE_NS {

namespace {

struct BitmapList {
    std::vector<mtmd_bitmap *> items;
    ~BitmapList() {
        for (auto * b : items) {
            mtmd_bitmap_free(b);
        }
    }
};

struct ChunkList {
    mtmd_input_chunks * p = mtmd_input_chunks_init();
    ~ChunkList() { mtmd_input_chunks_free(p); }
};

// The error lines libmtmd logged on this thread since they were last taken: its reason for a failure.
std::string logged_errors() {
    std::string why;
    for (const auto & line : compat::engine_log_errors(true)) {
        why += line;
    }
    while (!why.empty() && (why.back() == '\n' || why.back() == ' ')) {
        why.pop_back();
    }
    return why;
}

}  // namespace

Projector::Projector(std::shared_ptr<Model> model, const ProjectorParams & params) : model_(std::move(model)) {
    mtmd_context_params p = mtmd_context_params_default();
#ifdef PYLOCALAI_ENGINE_IK
    p.verbosity = GGML_LOG_LEVEL_WARN;  // becomes the clip logger's threshold at init
    g_logger_state.log_callback = compat::engine_log;  // with patch 0003, the helper's lines come here too
    g_logger_state.log_callback_user_data = nullptr;
#else
    mtmd_helper_log_set(compat::engine_log, nullptr);
    p.warmup = params.warmup;
#endif
    p.use_gpu = params.use_gpu;
    p.print_timings = false;
    p.media_marker = mtmd_default_marker();
    if (params.n_threads > 0) {
        p.n_threads = params.n_threads;
    }
    p.image_min_tokens = params.image_min_tokens;
    p.image_max_tokens = params.image_max_tokens;
    compat::engine_log_errors(true);
    ctx_ = mtmd_init_from_file(params.path.c_str(), model_->raw(), p);
    if (ctx_ == nullptr) {
        const std::string why = logged_errors();
        throw EngineError("failed to load multimodal projector from '" + params.path + "'" +
                          (why.empty() ? std::string() : ": " + why));
    }
}

Projector::~Projector() { mtmd_free(ctx_); }

bool Projector::vision() const { return mtmd_support_vision(ctx_); }

bool Projector::audio() const { return mtmd_support_audio(ctx_); }

std::string Projector::marker() const { return mtmd_default_marker(); }

std::vector<MediaSegment> Projector::tokenize(const std::string & prompt, const std::vector<std::string> & files,
                                              bool add_special, bool parse_special) const {
#ifdef PYLOCALAI_ENGINE_IK
    std::lock_guard<std::mutex> lock(mu_);  // ik's libmtmd does not promise a thread-safe tokenize
#endif
    const std::string mark = marker();
    size_t n_markers = 0;
    for (size_t at = prompt.find(mark); at != std::string::npos; at = prompt.find(mark, at + mark.size())) {
        ++n_markers;
    }
    if (n_markers != files.size()) {
        throw std::invalid_argument("the prompt holds " + std::to_string(n_markers) + " media marker(s) for " +
                                    std::to_string(files.size()) + " media item(s): a different number of media markers "
                                    "than items (does the chat template render the markers?)");
    }
    BitmapList bitmaps;
#ifndef PYLOCALAI_ENGINE_IK
    const mtmd_helper_init_opt opt = mtmd_helper_init_opt_default();
#endif
    for (size_t i = 0; i < files.size(); ++i) {
        const auto & f = files[i];
        compat::engine_log_errors(true);
#ifdef PYLOCALAI_ENGINE_IK
        struct {
            mtmd_bitmap * bitmap;
        } w{mtmd_helper_bitmap_init_from_buf(ctx_, reinterpret_cast<const unsigned char *>(f.data()), f.size())};
#else
        auto w = mtmd_helper_bitmap_init_from_buf(ctx_, reinterpret_cast<const unsigned char *>(f.data()), f.size(),
                                                  false, opt);
        if (w.video_ctx != nullptr) {
            mtmd_helper_video_free(w.video_ctx);
        }
#endif
        if (w.bitmap == nullptr) {
            const std::string why = logged_errors();  // e.g. audio for a projector that takes none
            throw std::invalid_argument("media item " + std::to_string(i) + " could not be decoded: " +
                                        (why.empty() ? "not an image (PNG, JPEG, BMP, GIF, ...) or audio file (WAV, MP3, FLAC)"
                                                     : why));
        }
        bitmaps.items.push_back(w.bitmap);
        const bool is_audio = mtmd_bitmap_is_audio(w.bitmap);
        if (is_audio && !audio()) {
            throw std::invalid_argument("media item " + std::to_string(i) + " is audio, but this model's projector takes no audio");
        }
        if (!is_audio && !vision()) {
            throw std::invalid_argument("media item " + std::to_string(i) + " is an image, but this model's projector takes no images");
        }
    }
#ifdef PYLOCALAI_ENGINE_IK
    mtmd_input_text text{prompt.c_str(), add_special, parse_special};
#else
    mtmd_input_text text{prompt.c_str(), prompt.size(), add_special, parse_special};
#endif
    ChunkList chunks;
    compat::engine_log_errors(true);
    const int32_t rc = mtmd_tokenize(ctx_, chunks.p, &text, const_cast<const mtmd_bitmap **>(bitmaps.items.data()),
                                     bitmaps.items.size());
    if (rc != 0) {
        const std::string why = logged_errors();
        throw std::invalid_argument("the media could not be prepared for this projector (code " + std::to_string(rc) +
                                    (why.empty() ? std::string(")") : "): " + why));
    }
    std::vector<MediaSegment> out;
    const size_t n = mtmd_input_chunks_size(chunks.p);
    for (size_t i = 0; i < n; ++i) {
        const mtmd_input_chunk * c = mtmd_input_chunks_get(chunks.p, i);
        MediaSegment seg;
        if (mtmd_input_chunk_get_type(c) == MTMD_INPUT_CHUNK_TYPE_TEXT) {
            size_t n_tok = 0;
            const llama_token * toks = mtmd_input_chunk_get_tokens_text(c, &n_tok);
            seg.tokens.assign(toks, toks + n_tok);
            if (seg.tokens.empty()) {
                continue;
            }
        } else {
            auto m = std::make_shared<MediaChunk>();
            m->chunk = std::shared_ptr<mtmd_input_chunk>(mtmd_input_chunk_copy(c), mtmd_input_chunk_free);
            m->n_tokens = static_cast<int32_t>(mtmd_input_chunk_get_n_tokens(c));
            m->n_pos = static_cast<int32_t>(mtmd_input_chunk_get_n_pos(c));
            const char * id = mtmd_input_chunk_get_id(c);
            m->id = id != nullptr ? id : "";
            m->audio = mtmd_input_chunk_get_type(c) == MTMD_INPUT_CHUNK_TYPE_AUDIO;
            seg.media = std::move(m);
        }
        out.push_back(std::move(seg));
    }
    return out;
}

int32_t Projector::eval(Session & session, const MediaChunk & media, int32_t seq, int32_t pos) {
    std::lock_guard<std::mutex> lock(mu_);
    llama_pos next = pos;
    const int32_t rc = mtmd_helper_eval_chunk_single(ctx_, session.raw(), media.chunk.get(), pos, seq,
                                                     static_cast<int32_t>(session.n_batch()), false, &next);
    if (rc != 0) {
        throw EngineError("encoding or decoding a media item failed (code " + std::to_string(rc) +
                          "): the context may be full");
    }
    return next;
}

}  // namespace PYLOCALAI_ENGINE_NS
