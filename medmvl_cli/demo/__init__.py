"""`medmvl demo`: a Gradio page to view a 2D image or a 3D volume and chat with a model about it.

``handlers`` holds what the page does (plain functions, no Gradio), ``app`` the page itself,
``study`` how an upload is checked and opened, ``viewer`` how a volume's slices are drawn and
``model_info`` what the page says about the model. Gradio is an optional extra (``.[demo]``) and is
imported only by ``app``.
"""
