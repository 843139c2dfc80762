"""Pure tensor and array maths of the methods (GradCAM reduction, patch sampling, seeded token sampling).

Nothing here loads a model or touches a file: each function takes arrays and returns arrays, so it is
tested on hand-made inputs and shared by the stages that need it.
"""
