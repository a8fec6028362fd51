"""System messages and few-shot examples for the three kinds of instruction data, written for this project.

Each few-shot pairs a symbolic image (captions, then normalized boxes) with the answer in the expected format.
The drafter never sees the image: every message reminds it to speak as if it did, and never of captions or boxes.
"""

KINDS = ("conversation", "detail", "complex")

_SEEING = (
    "You are an AI visual assistant looking at a single image. What you see is given to you as several sentences "
    "describing the image, followed by the objects in it, one per line as `label: [x1, y1, x2, y2]`: a bounding box "
    "in coordinates normalized to 0-1, x from left to right and y from top to bottom. Speak as someone who is "
    "looking at the image itself: never mention descriptions, captions, boxes or coordinates as your source."
)

SYSTEM_MESSAGES = {
    "conversation": _SEEING + (
        "\n\nWrite a conversation between a person asking about this image and you answering. Ask about what is "
        "visible: object types, how many there are, what they are doing, where they are and how they are placed "
        "relative to each other. Only ask questions that the image answers with certainty; skip anything that "
        "cannot be told for sure. Answer in a helpful, natural tone, in full sentences. Write 3 to 5 exchanges in "
        "exactly this format, blocks separated by a line with ===:\nQuestion:\n...\n===\nAnswer:\n...\n===\n"
        "Question:\n...\n===\nAnswer:\n..."
    ),
    "detail": _SEEING + (
        "\n\nDescribe the image in rich detail: the scene as a whole, each notable object, its appearance, where it "
        "is and how it relates to the others, and what is happening. Use counts and positions where they help. "
        "Write one or two paragraphs of plain prose, with no heading or list."
    ),
    "complex": _SEEING + (
        "\n\nAsk one question about the image that needs reasoning or background knowledge beyond listing what is "
        "visible: why something is the way it is, what may happen next, what a person could do, what risks or "
        "purposes there are. Then answer it step by step, grounding each step in what the image shows. Use exactly "
        "this format:\nQuestion:\n...\n===\nAnswer:\n..."
    ),
}

_KITCHEN = (
    "A woman slices vegetables on a wooden counter next to a window.\n"
    "A kitchen with a cutting board, a knife and a bowl of tomatoes.\n"
    "person: [0.412, 0.105, 0.731, 0.968]\n"
    "knife: [0.52, 0.611, 0.64, 0.655]\n"
    "bowl: [0.118, 0.64, 0.297, 0.792]\n"
    "bowl: [0.781, 0.702, 0.932, 0.83]"
)
_PARK = (
    "Two dogs run across a grassy park while a man watches from a bench.\n"
    "A sunny afternoon in a park with dogs playing.\n"
    "dog: [0.05, 0.55, 0.31, 0.82]\n"
    "dog: [0.36, 0.6, 0.58, 0.85]\n"
    "person: [0.74, 0.31, 0.88, 0.74]\n"
    "bench: [0.69, 0.52, 0.99, 0.8]"
)

FEW_SHOTS = {
    "conversation": [
        (_KITCHEN,
         "Question:\nWhat is the woman doing?\n===\nAnswer:\nShe is slicing vegetables on a wooden cutting board "
         "at the kitchen counter.\n===\nQuestion:\nHow many bowls are on the counter?\n===\nAnswer:\nThere are two "
         "bowls: one on the left side of the counter and one on the right.\n===\nQuestion:\nWhat is in the bowl on "
         "the left?\n===\nAnswer:\nThe bowl on the left holds tomatoes.\n===\nQuestion:\nIs the knife closer to "
         "the woman or to the bowls?\n===\nAnswer:\nThe knife is in front of the woman, in the middle of the "
         "counter, between the two bowls."),
        (_PARK,
         "Question:\nHow many dogs are in the park?\n===\nAnswer:\nThere are two dogs, running side by side on the "
         "grass.\n===\nQuestion:\nWhere is the man?\n===\nAnswer:\nThe man sits on a bench on the right side of the "
         "image, watching the dogs.\n===\nQuestion:\nWhich way are the dogs from the bench?\n===\nAnswer:\nThe dogs "
         "are to the left of the bench, in the lower half of the picture."),
    ],
    "detail": [
        (_KITCHEN,
         "The image shows a bright kitchen where a woman stands at a wooden counter beside a window, slicing "
         "vegetables on a cutting board. She fills the middle of the frame, holding a knife just in front of her. "
         "Two bowls sit on the counter: the one on the left is full of ripe tomatoes, and a second bowl rests on the "
         "right edge of the counter. The daylight from the window and the fresh produce give the scene a calm, "
         "homely feel of a meal being prepared."),
    ],
    "complex": [
        (_KITCHEN,
         "Question:\nWhat is the woman most likely preparing, and what should she be careful about?\n===\nAnswer:\n"
         "She is slicing vegetables next to a bowl of tomatoes, so she is most likely preparing a salad or a sauce. "
         "First, the knife in front of her shows she is cutting by hand. Second, the tomatoes waiting in the bowl "
         "suggest they are the next to be cut. Because she is working with a sharp knife on a cutting board, she "
         "should keep her fingers curled away from the blade and the board steady on the counter."),
        (_PARK,
         "Question:\nWhy might the man be sitting on the bench rather than playing with the dogs?\n===\nAnswer:\n"
         "The man is on a bench at the right of the park while the two dogs run across the grass on the left. "
         "First, the dogs are together, so they can play with each other without him. Second, a bench gives him a "
         "place to rest while keeping the dogs in sight. So he is most likely their owner, letting them burn off "
         "energy while he watches over them."),
    ],
}

DETAIL_INSTRUCTIONS = (
    "Describe the following image in detail.",
    "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.",
    "Share a comprehensive rundown of the presented image.",
    "Offer a thorough analysis of the image.",
    "Explain the various aspects of the image before you.",
    "Clarify the contents of the displayed image with great detail.",
    "Characterize the image using a well-detailed description.",
    "Break down the elements of the image in a detailed manner.",
    "Walk through the important details of the image.",
    "Portray the image with a rich, descriptive narrative.",
    "Narrate the contents of the image with precision.",
    "Analyze the image in a comprehensive and detailed manner.",
    "Illustrate the image through a descriptive explanation.",
    "Examine the image closely and share its details.",
    "Write an exhaustive depiction of the given image.",
)

