"""Exactness sweep over Hugging Face architectures: each a tiny random-initialized config (no
download), one OrthoGrad step in the API contract's order (``with og.retain(): ...backward()``,
the unlearn backward, ``project_()``) against the oracle (benchmarks/oracle.py), one line per model.
Diagnostic tool, not part of the timed suite or of CI.

    python -m benchmarks.hf_sweep --out sweep.txt [--dtype float64] [--models bert,...]

``--dtype float64`` runs the model, its loss and the oracle's per-sample loop in float64 (a
mismatch there is no rounding; models that compute inside in float32, e.g. RecurrentGemma's scan,
stay at ~1e-7); the default float32 is what users run (tolerance 1e-3). B = 5 retain / 3 unlearn
samples, 3 classes (a language model's logits at the last position, first 3 entries). Lines read
``name ok|MISMATCH|ERR|ORACLE|BUILD ...``: ERR is the step's error (a refusal names the module and
what to do: trainable mixture-of-experts layers, sequence-first XLNet), ORACLE the oracle's own
failure (an input the model rejects, RWKV's in-place state in eval mode), BUILD a config this
transformers version does not take. Every line also gives og.stats['fallback'] (empty: no module
went to the torch.func fallback).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings

import torch

from . import oracle as O


def _ce(o, y):
    return torch.nn.functional.cross_entropy(o if o.dtype == torch.float64 else o.float(), y, reduction="none")


class W(torch.nn.Module):
    """``forward(x) -> [B, 3]`` logits of a Hugging Face model (``kind``: its input)."""

    def __init__(self, hf, kind):
        super().__init__()
        self.hf, self.kind = hf, kind

    def forward(self, x):
        if self.kind == "clipimg":
            return self.hf(pixel_values=x).image_embeds[..., :3]
        out = self.hf(input_values=x) if self.kind == "audio" else self.hf(x)
        lg = out.logits
        return (lg[:, -1] if lg.dim() == 3 else lg)[..., :3]


TX = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24)
LM = dict(vocab_size=40, **TX)
SC = dict(vocab_size=40, num_labels=3, hidden_dropout_prob=0, attention_probs_dropout_prob=0, max_position_embeddings=20, **TX)
VIS = dict(num_labels=3)


def _tf():
    import transformers

    return transformers


def lm(cfgname, clsname, **kw):
    tf = _tf()
    return getattr(tf, clsname)(getattr(tf, cfgname)(**kw)).eval(), "ids"


def vis(cfgname, clsname, **kw):
    tf = _tf()
    return getattr(tf, clsname)(getattr(tf, cfgname)(**kw)).eval(), "img"


def A(model_type, clsname, kind, **kw):
    """A builder from ``AutoConfig.for_model(model_type, **kw)``."""

    def make():
        tf = _tf()
        return getattr(tf, clsname)(tf.AutoConfig.for_model(model_type, **kw)).eval(), kind

    return make


class _TfProxy:
    def __getattr__(self, name):
        return getattr(_tf(), name)


tf = _TfProxy()  # (the builders below name transformers' classes as tf.X)

CASES = {
    "mixtral": lambda: lm("MixtralConfig","MixtralForCausalLM",vocab_size=40,num_key_value_heads=1,num_local_experts=4,num_experts_per_tok=2,**TX),
    "qwen2_moe": lambda: lm("Qwen2MoeConfig","Qwen2MoeForCausalLM",vocab_size=40,num_key_value_heads=1,num_experts=4,num_experts_per_tok=2,moe_intermediate_size=12,shared_expert_intermediate_size=12,**TX),
    "olmoe": lambda: lm("OlmoeConfig","OlmoeForCausalLM",vocab_size=40,num_key_value_heads=1,num_experts=4,num_experts_per_tok=2,**TX),
    "albert": lambda: lm("AlbertConfig","AlbertForSequenceClassification",vocab_size=40,embedding_size=8,num_labels=3,hidden_dropout_prob=0,attention_probs_dropout_prob=0,**TX),
    "electra": lambda: lm("ElectraConfig","ElectraForSequenceClassification",vocab_size=40,embedding_size=8,num_labels=3,hidden_dropout_prob=0,attention_probs_dropout_prob=0,**TX),
    "mistral": lambda: lm("MistralConfig","MistralForCausalLM",vocab_size=40,num_key_value_heads=1,**TX),
    "qwen2": lambda: lm("Qwen2Config","Qwen2ForCausalLM",vocab_size=40,num_key_value_heads=1,**TX),
    "phi": lambda: lm("PhiConfig","PhiForCausalLM",vocab_size=40,resid_pdrop=0,embd_pdrop=0,attention_dropout=0,**TX),
    "gpt_neox": lambda: lm("GPTNeoXConfig","GPTNeoXForCausalLM",vocab_size=40,**TX),
    "gemma": lambda: lm("GemmaConfig","GemmaForCausalLM",vocab_size=40,num_key_value_heads=1,head_dim=8,**TX),
    "opt": lambda: lm("OPTConfig","OPTForCausalLM",vocab_size=40,hidden_size=16,num_hidden_layers=2,num_attention_heads=2,ffn_dim=24,word_embed_proj_dim=16,dropout=0,attention_dropout=0,max_position_embeddings=20),
    "bart": lambda: lm("BartConfig","BartForSequenceClassification",vocab_size=40,d_model=16,encoder_layers=1,decoder_layers=1,encoder_attention_heads=2,decoder_attention_heads=2,encoder_ffn_dim=24,decoder_ffn_dim=24,num_labels=3,dropout=0,attention_dropout=0,max_position_embeddings=20,pad_token_id=1,eos_token_id=2),
    "deberta_v2": lambda: lm("DebertaV2Config","DebertaV2ForSequenceClassification",vocab_size=40,num_labels=3,hidden_dropout_prob=0,attention_probs_dropout_prob=0,max_position_embeddings=20,**TX),
    "deit": lambda: vis("DeiTConfig","DeiTForImageClassification",image_size=16,patch_size=4,num_labels=3,**TX),
    "beit": lambda: vis("BeitConfig","BeitForImageClassification",image_size=16,patch_size=4,num_labels=3,use_relative_position_bias=True,**TX),
    "clip_vision": lambda: (tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(image_size=16,patch_size=4,projection_dim=8,**TX)).eval(),"clipimg"),
    "dinov2": lambda: vis("Dinov2Config","Dinov2ForImageClassification",image_size=16,patch_size=4,num_labels=3,**TX),
    "levit": lambda: vis("LevitConfig","LevitForImageClassification",image_size=32,num_labels=3),
    "efficientformer": None,
    "regnet": lambda: vis("RegNetConfig","RegNetForImageClassification",num_labels=3,embedding_size=8,hidden_sizes=[8,16],depths=[1,1],groups_width=4),
    "poolformer": lambda: vis("PoolFormerConfig","PoolFormerForImageClassification",num_labels=3,hidden_sizes=[8,16,16,16],depths=[1,1,1,1],num_encoder_blocks=4),
    "mobilevit": lambda: vis("MobileViTConfig","MobileViTForImageClassification",image_size=32,num_labels=3,hidden_sizes=[16,24,32],neck_hidden_sizes=[8,8,16,16,24,24,32]),
    "wav2vec2": lambda: (tf.Wav2Vec2ForSequenceClassification(tf.Wav2Vec2Config(vocab_size=10,hidden_size=16,num_hidden_layers=1,num_attention_heads=2,intermediate_size=24,conv_dim=(8,8),conv_stride=(4,2),conv_kernel=(8,4),num_conv_pos_embeddings=4,num_conv_pos_embedding_groups=2,num_labels=3,hidden_dropout=0,attention_dropout=0,activation_dropout=0,feat_proj_dropout=0,layerdrop=0,mask_time_prob=0,final_dropout=0)).eval(),"audio"),
    "segformer": lambda: vis("SegformerConfig","SegformerForImageClassification",num_labels=3,num_encoder_blocks=2,depths=[1,1],sr_ratios=[2,1],hidden_sizes=[8,16],num_attention_heads=[1,2],patch_sizes=[7,3],strides=[4,2],mlp_ratios=[2,2],image_size=32),
    "convnextv2": lambda: vis("ConvNextV2Config","ConvNextV2ForImageClassification",num_labels=3,hidden_sizes=[8,16],depths=[1,1],num_stages=2),
    "swinv2": lambda: vis("Swinv2Config","Swinv2ForImageClassification",image_size=32,patch_size=4,embed_dim=8,depths=[1,1],num_heads=[1,2],window_size=4,num_labels=3),
    "dinov2reg": lambda: vis("Dinov2WithRegistersConfig","Dinov2WithRegistersForImageClassification",image_size=16,patch_size=4,num_labels=3,num_register_tokens=2,**TX),
    "mamba": lambda: lm("MambaConfig","MambaForCausalLM",vocab_size=40,hidden_size=16,num_hidden_layers=1,state_size=4,expand=2,conv_kernel=3),
    "pvtv2": lambda: vis("PvtV2Config","PvtV2ForImageClassification",num_labels=3,hidden_sizes=[8,16],depths=[1,1],num_encoder_blocks=2,sr_ratios=[2,1],num_attention_heads=[1,2],patch_sizes=[7,3],strides=[4,2],mlp_ratios=[2,2],image_size=32),
    "focalnet": lambda: vis("FocalNetConfig","FocalNetForImageClassification",image_size=32,patch_size=4,embed_dim=8,depths=[1,1],num_labels=3),
    "vitmae_cls": lambda: vis("ViTMSNConfig","ViTMSNForImageClassification",image_size=16,patch_size=4,num_labels=3,**TX),
    "roberta": lambda: lm("RobertaConfig","RobertaForSequenceClassification",vocab_size=40,num_labels=3,hidden_dropout_prob=0,attention_probs_dropout_prob=0,max_position_embeddings=20,pad_token_id=1,**TX),
    "gemma2": lambda: lm("Gemma2Config","Gemma2ForCausalLM",vocab_size=40,num_key_value_heads=1,head_dim=8,**TX),
    "qwen3": lambda: lm("Qwen3Config","Qwen3ForCausalLM",vocab_size=40,num_key_value_heads=1,head_dim=8,**TX),
    "gpt_neo": A("gpt_neo","GPTNeoForCausalLM","ids",vocab_size=40,hidden_size=16,num_layers=2,num_heads=2,attention_types=[[["global","local"],1]],window_size=4,max_position_embeddings=20),
    "gptj": A("gptj","GPTJForCausalLM","ids",vocab_size=40,n_embd=16,n_layer=2,n_head=2,rotary_dim=4,n_positions=20),
    "bloom": A("bloom","BloomForCausalLM","ids",vocab_size=40,hidden_size=16,n_layer=2,n_head=2),
    "falcon": A("falcon","FalconForCausalLM","ids",vocab_size=40,hidden_size=16,num_hidden_layers=2,num_attention_heads=2),
    "codegen": A("codegen","CodeGenForCausalLM","ids",vocab_size=40,n_embd=16,n_layer=2,n_head=2,rotary_dim=4,n_positions=20,n_ctx=20),
    "stablelm": A("stablelm","StableLmForCausalLM","ids",num_key_value_heads=1,**LM),
    "phi3": A("phi3","Phi3ForCausalLM","ids",num_key_value_heads=1,pad_token_id=0,**LM),
    "granite": A("granite","GraniteForCausalLM","ids",num_key_value_heads=1,**LM),
    "cohere": A("cohere","CohereForCausalLM","ids",num_key_value_heads=1,**LM),
    "olmo": A("olmo","OlmoForCausalLM","ids",num_key_value_heads=1,**LM),
    "olmo2": A("olmo2","Olmo2ForCausalLM","ids",num_key_value_heads=1,**LM),
    "starcoder2": A("starcoder2","Starcoder2ForCausalLM","ids",num_key_value_heads=1,**LM),
    "persimmon": A("persimmon","PersimmonForCausalLM","ids",**LM),
    "xglm": A("xglm","XGLMForCausalLM","ids",vocab_size=40,d_model=16,num_layers=2,attention_heads=2,ffn_dim=24,max_position_embeddings=20),
    "gpt_bigcode": A("gpt_bigcode","GPTBigCodeForCausalLM","ids",vocab_size=40,n_embd=16,n_layer=2,n_head=2,n_positions=20),
    "rwkv": A("rwkv","RwkvForCausalLM","ids",vocab_size=40,hidden_size=16,num_hidden_layers=2,attention_hidden_size=16,intermediate_size=24,context_length=20),
    "mamba2": A("mamba2","Mamba2ForCausalLM","ids",vocab_size=40,hidden_size=16,num_hidden_layers=1,state_size=4,expand=2,conv_kernel=3,num_heads=4,head_dim=8,n_groups=1,chunk_size=4),
    "recurrent_gemma": A("recurrent_gemma","RecurrentGemmaForCausalLM","ids",vocab_size=40,hidden_size=16,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1,intermediate_size=24,lru_width=16,attention_window_size=4,block_types=["recurrent","attention"]),
    "distilbert": A("distilbert","DistilBertForSequenceClassification","ids",vocab_size=40,dim=16,n_layers=2,n_heads=2,hidden_dim=24,num_labels=3,max_position_embeddings=20,dropout=0,attention_dropout=0),
    "xlm_roberta": A("xlm-roberta","XLMRobertaForSequenceClassification","ids",pad_token_id=1,**SC),
    "mpnet": A("mpnet","MPNetForSequenceClassification","ids",**SC),
    "funnel": A("funnel","FunnelForSequenceClassification","ids",vocab_size=40,block_sizes=[1,1],d_model=16,n_head=2,d_head=8,d_inner=24,num_labels=3,hidden_dropout=0,attention_dropout=0,activation_dropout=0),
    "big_bird": A("big_bird","BigBirdForSequenceClassification","ids",attention_type="original_full",**SC),
    "xlnet": A("xlnet","XLNetForSequenceClassification","ids",vocab_size=40,d_model=16,n_layer=2,n_head=2,d_inner=24,num_labels=3,dropout=0),
    "fnet": A("fnet","FNetForSequenceClassification","ids",vocab_size=40,hidden_size=16,num_hidden_layers=2,intermediate_size=24,num_labels=3,max_position_embeddings=20,hidden_dropout_prob=0),
    "squeezebert": A("squeezebert","SqueezeBertForSequenceClassification","ids",embedding_size=16,q_groups=1,k_groups=1,v_groups=1,post_attention_groups=1,intermediate_groups=1,output_groups=1,**SC),
    "mobilebert": A("mobilebert","MobileBertForSequenceClassification","ids",embedding_size=16,intra_bottleneck_size=16,true_hidden_size=16,num_feedforward_networks=2,**SC),
    "convbert": A("convbert","ConvBertForSequenceClassification","ids",embedding_size=16,head_ratio=1,conv_kernel_size=3,**SC),
    "roformer": A("roformer","RoFormerForSequenceClassification","ids",embedding_size=16,**SC),
    "ernie": A("ernie","ErnieForSequenceClassification","ids",**SC),
    "rembert": A("rembert","RemBertForSequenceClassification","ids",input_embedding_size=8,output_embedding_size=8,**SC),
    "nystromformer": A("nystromformer","NystromformerForSequenceClassification","ids",segment_means_seq_len=6,num_landmarks=2,**SC),
    "t5enc": A("t5","T5ForSequenceClassification","ids",vocab_size=40,d_model=16,d_kv=8,d_ff=24,num_layers=2,num_heads=2,num_labels=3,dropout_rate=0,decoder_start_token_id=0,pad_token_id=0),
    "pegasus": A("pegasus","PegasusForCausalLM","ids",vocab_size=40,d_model=16,encoder_layers=1,decoder_layers=1,encoder_attention_heads=2,decoder_attention_heads=2,encoder_ffn_dim=24,decoder_ffn_dim=24,max_position_embeddings=20,dropout=0),
    "mbart": A("mbart","MBartForCausalLM","ids",vocab_size=40,d_model=16,encoder_layers=1,decoder_layers=1,encoder_attention_heads=2,decoder_attention_heads=2,encoder_ffn_dim=24,decoder_ffn_dim=24,max_position_embeddings=20,dropout=0),
    "efficientnet": A("efficientnet","EfficientNetForImageClassification","img",image_size=32,width_coefficient=0.25,depth_coefficient=0.1,hidden_dim=320,num_labels=3,dropout_rate=0,drop_connect_rate=0),
    "mobilenet_v1": A("mobilenet_v1","MobileNetV1ForImageClassification","img",image_size=32,depth_multiplier=0.1,num_labels=3,classifier_dropout_prob=0),
    "mobilevitv2": A("mobilevitv2","MobileViTV2ForImageClassification","img",image_size=64,width_multiplier=0.25,num_labels=3,classifier_dropout_prob=0),
    "bit": A("bit","BitForImageClassification","img",embedding_size=8,hidden_sizes=[8,16],depths=[1,1],num_groups=4,num_labels=3),
    "van": A("van","VanForImageClassification","img",image_size=32,hidden_sizes=[8,16],depths=[1,1],mlp_ratios=[2,2],patch_sizes=[7,3],strides=[4,2],num_labels=3),
    "hiera": A("hiera","HieraForImageClassification","img",image_size=[32,32],patch_size=[3,3],patch_stride=[2,2],patch_padding=[1,1],embed_dim=8,num_heads=[1,2],depths=[1,1],query_stride=[2,2],masked_unit_size=[4,4],num_query_pool=1,num_labels=3),
    "pvt": A("pvt","PvtForImageClassification","img",image_size=32,num_encoder_blocks=2,depths=[1,1],sequence_reduction_ratios=[2,1],hidden_sizes=[8,16],patch_sizes=[4,2],strides=[4,2],num_attention_heads=[1,2],mlp_ratios=[2,2],num_labels=3),
    "swiftformer": A("swiftformer","SwiftFormerForImageClassification","img",image_size=32,depths=[1,1,1,1],embed_dims=[8,8,16,16],num_labels=3),
    "data2vec_vision": A("data2vec-vision","Data2VecVisionForImageClassification","img",image_size=16,patch_size=4,use_relative_position_bias=True,use_mean_pooling=True,layer_scale_init_value=0.1,**VIS,**TX),
    "dinov2_layerscale": A("dinov2","Dinov2ForImageClassification","img",image_size=16,patch_size=4,layerscale_value=0.5,**VIS,**TX),
    "hubert": A("hubert","HubertForSequenceClassification","audio",num_labels=3,conv_dim=[8,8],conv_stride=[5,2],conv_kernel=[10,3],num_conv_pos_embeddings=4,num_conv_pos_embedding_groups=2,**TX),
    "wavlm": A("wavlm","WavLMForSequenceClassification","audio",num_labels=3,conv_dim=[8,8],conv_stride=[5,2],conv_kernel=[10,3],num_conv_pos_embeddings=4,num_conv_pos_embedding_groups=2,num_buckets=8,max_bucket_distance=20,**TX),
    "sew": A("sew","SEWForSequenceClassification","audio",num_labels=3,conv_dim=[8,8],conv_stride=[5,2],conv_kernel=[10,3],num_conv_pos_embeddings=4,num_conv_pos_embedding_groups=2,squeeze_factor=2,**TX),
    "unispeech": A("unispeech","UniSpeechForSequenceClassification","audio",num_labels=3,conv_dim=[8,8],conv_stride=[5,2],conv_kernel=[10,3],num_conv_pos_embeddings=4,num_conv_pos_embedding_groups=2,**TX),
    "ast": A("audio-spectrogram-transformer","ASTForAudioClassification","spec",num_labels=3,patch_size=4,frequency_stride=4,time_stride=4,max_length=16,num_mel_bins=16,**TX),
    "imagegpt": A("imagegpt","ImageGPTForImageClassification","ids",vocab_size=41,n_embd=16,n_layer=2,n_head=2,n_positions=20,num_labels=3),
}

# RWKV's eval mode keeps its state with in-place writes that no backward survives
TRAIN_MODE = {"rwkv"}


def _inputs(kind, b, hf, g, dt):
    if kind == "ids":
        return torch.randint(3, 40, (b, 6), generator=g)
    if kind in ("img", "clipimg"):
        s = getattr(hf.config, "image_size", 32)
        s = s if isinstance(s, int) else 32
        return torch.randn(b, 3, s, s, generator=g, dtype=dt)
    if kind == "audio":
        return torch.randn(b, 400, generator=g, dtype=dt)
    if kind == "spec":
        return torch.randn(b, 16, 16, generator=g, dtype=dt)
    raise ValueError(kind)


def check_one(name: str, dt: torch.dtype, tb: bool = False) -> str:
    from orthograd_fast import OrthoGrad

    g = torch.Generator().manual_seed(0)
    try:
        torch.manual_seed(0)
        hf, kind = CASES[name]()
        if name in TRAIN_MODE:
            hf.train()
    except Exception as e:  # noqa: BLE001 (a config this transformers version rejects)
        return f"{name} BUILD {type(e).__name__}: {str(e)[:200]}".replace("\n", " ")
    m = W(hf, kind).to(dt)
    xr, xu = _inputs(kind, 5, hf, g, dt), _inputs(kind, 3, hf, g, dt)
    yr, yu = torch.randint(0, 3, (5,), generator=g), torch.randint(0, 3, (3,), generator=g)
    try:
        orc = O.oracle_direction(m, _ce, (xr, yr), (xu, yu), loop_dtype=dt)
    except Exception as e:  # noqa: BLE001
        return f"{name} ORACLE {type(e).__name__}: {str(e)[:200]}".replace("\n", " ")
    og = OrthoGrad(m)
    try:
        m.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with og.retain():
                _ce(m(xr), yr).mean().backward()
            _ce(m(xu), yu).mean().backward()
            og.project_()
        r = O.compare(O.grads_as_dict(m), orc)
        return f"{name} {'ok' if r.ok else 'MISMATCH'} {r.message[:300]} fallback={og.stats['fallback'][:3]}".replace("\n", " ")
    except Exception as e:  # noqa: BLE001
        if tb:
            traceback.print_exc()
        return f"{name} ERR {type(e).__name__}: {str(e)[:300]}".replace("\n", " ")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--models", default=None, help="comma-separated subset of CASES")
    ap.add_argument("--traceback", action="store_true", help="print the traceback of each ERR")
    args = ap.parse_args(argv)
    import transformers

    dt = getattr(torch, args.dtype)
    names = args.models.split(",") if args.models else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        sys.exit(f"unknown model(s) {unknown}; known: {', '.join(CASES)}")
    t0 = time.time()
    with open(args.out, "w") as f:
        f.write(f"# hf_sweep {args.dtype}, torch {torch.__version__}, transformers {transformers.__version__}\n")
        for n in names:
            line = check_one(n, dt, args.traceback)
            print(line, flush=True)
            f.write(line + "\n")
        f.write(f"# {len(names)} models in {time.time() - t0:.0f} s\n")


if __name__ == "__main__":
    main()
