import horizon


class DemoPanel(horizon.Panel):
    name = "Keel demo"
    slug = "keel_demo"
