from twisted.application.service import ServiceMaker

capsule = ServiceMaker(
    "capsule",
    "capsule.tap",
    "Browser terminals in fresh, isolated, resource-limited Docker containers.",
    "capsule",
)
