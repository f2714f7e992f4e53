"""A tiny tensorflow-datasets builder (ArrayRecord, no TensorFlow) for the stage-0 tfds source test."""

import tensorflow_datasets as tfds


class TinyText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()})
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(12):
            yield i, {"text": "" if i == 3 else f"<{i:02d}>" + "t" * i}
