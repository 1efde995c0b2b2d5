"""trainlab's health detectors inside other frameworks' training loops: a callback for Lightning
(`trainlab.integrations.lightning`, extra `trainlab[lightning]`) and one for the Hugging Face
Trainer (`trainlab.integrations.transformers`, extra `trainlab[transformers]`).  Neither framework
is a dependency of trainlab: each module imports its own, and says which extra installs it."""
