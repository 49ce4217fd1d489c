"""OpenAI message content parts that carry text. Read by the server's protocol and by the chat template;
kept free of transformers so the API process imports before the engine core starts."""

TEXT_PART_TYPES = ("text", "input_text")
