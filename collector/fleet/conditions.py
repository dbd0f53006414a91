"""The condition catalogue: everything posfleet says about each condition, in one entry per condition.

Detection (collector.fleet.detect) decides *whether* a condition holds; everything else reads its words and
placement from here: its severity, the diagnosis checklist step and rank, the probable causes by detail, the
terminal alert(s) with summary/description/cause (exporters.alerting.rules renders them; the runbook is
docs/runbooks/<alert name>.md), the merchant's message in English and Simplified Chinese, and which conditions
the dashboards count as critical. Diagnosis-only findings (the acquirer's side, a clean shutdown, paper out) have
their own, smaller entries. Adding a condition: one `Condition` here plus its detection function (see
docs/architecture.md); tests/unit/test_conditions.py fails while any part is missing.

The alert texts are Prometheus templates (`$detail`, `$labels`) written for on-call; `causes` is the plain
sentence the API and the support desk show. Both live side by side so a change to one is seen next to the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "CATALOGUE", "FINDINGS", "RANK", "STEPS", "Alert", "Condition", "Finding", "Severity", "critical_conditions",
    "step_of",
]

Severity = Literal["critical", "warning"]

# The support desk's checklist, in the order an agent walks it (diagnosis shows one row per step).
STEPS: Final = (
    ("network_power", "Network and power"),
    ("hardware", "Printer, display and card reader"),
    ("software", "Software version and clock"),
    ("registration", "Merchant registration"),
    ("local_records", "Terminal's own records (upload queue)"),
    ("acquirer_records", "Reconciliation with the acquirer's records"),
    ("acquirer_host", "Acquirer's host (maintenance)"),
)


@dataclass(frozen=True, slots=True)
class Alert:
    """One Prometheus alert over `posfleet_terminal_problem{condition=...}` (texts are alert templates)."""

    name: str  # also the runbook's file name: docs/runbooks/<name>.md
    severity: Severity
    summary: str
    what: str  # completes "Terminal X (merchant, acquirer, site, model) ..."
    cause: str  # probable cause when the detail says nothing more specific
    causes: tuple[tuple[str, str], ...] = ()  # (detail, probable cause)
    severity_matcher: str = ""  # extra matcher on the series' own severity label


@dataclass(frozen=True, slots=True)
class Condition:
    """A per-terminal condition the collector detects and exposes."""

    name: str
    # observed per accepted heartbeat (with hysteresis), on every tick, or against the learned activity baseline
    # when its schedule says (collector.fleet.activity)
    kind: Literal["heartbeat", "time", "baseline"]
    severity: Severity  # when active; hardware_fault is downgraded to warning for paper_out alone (detect)
    step: str  # the diagnosis checklist step (STEPS) it belongs to
    causes: Mapping[str, str]  # detail -> probable cause for humans; "" is the default
    merchant: tuple[str, str]  # what to tell the merchant (en, zh-CN); {tid} and {since} are filled in
    alerts: tuple[Alert, ...]  # the alert(s) on-call receives for it


@dataclass(frozen=True, slots=True)
class Finding:
    """A diagnosis-only finding: not a condition of the terminal, but something the support desk must know."""

    name: str
    step: str
    cause: str = ""  # empty: the cause comes from the condition it refines (paper_out: hardware_fault's)
    merchant: tuple[str, str] | None = None  # None: never the primary cause (informational)


_CONDITIONS: Final = (
    Condition(
        name="offline",
        kind="time",
        severity="critical",
        step="network_power",
        causes={
            "last_will": (
                "The terminal's connection broke (its last will was published) and no heartbeat followed: "
                "network outage at the shop (router, Wi-Fi, SIM/cellular coverage) or a crash."
            ),
            "silent": (
                "No heartbeat and no goodbye: the terminal most likely lost power (unplugged, battery empty) or "
                "its network dropped silently."
            ),
            "never_seen": (
                "Registered but never heard from since the collector started: not installed, powered off, or "
                "configured with the wrong broker address or terminal id."
            ),
        },
        merchant=(
            (
                "Your payment terminal {tid} has been disconnected since {since}. Please check that it is "
                "switched on and that your internet connection (router, cable, Wi-Fi or SIM) works, then restart "
                "it. Payments taken while it was offline are sent when it reconnects."
            ),
            (
                "您的POS终端 {tid} 自 {since} 起与网络断开。请确认终端已开机、网络（路由器、网线、Wi-Fi 或 SIM "
                "卡）正常，然后重启终端。离线期间的交易会在恢复连接后上传。"
            ),
        ),
        alerts=(
            Alert(
                name="PosTerminalOffline",
                severity="critical",
                summary="POS terminal is offline.",
                what=(
                    "has sent no heartbeat for longer than its offline threshold and did not shut down cleanly{{ "
                    "with $detail }} ({{ . }}){{ end }}. It cannot take card payments, or its payments are not "
                    "reaching the acquirer."
                ),
                cause=(
                    "The terminal lost power or its network. Check power (plugged in, battery) and the network "
                    "at the shop (router, Wi-Fi, SIM/cellular coverage)."
                ),
                causes=(
                    ("last_will", (
                        "The terminal's connection broke (its last will was published) and no heartbeat "
                        "followed: a network outage at the shop or a crash. Check power (plugged in, battery) "
                        "and the network at the shop (router, Wi-Fi, SIM/cellular coverage)."
                    )),
                    ("silent", (
                        "No heartbeat and no goodbye: the terminal most likely lost power or its network dropped "
                        "silently. Check power (plugged in, battery) and the network at the shop (router, Wi-Fi, "
                        "SIM/cellular coverage)."
                    )),
                    ("never_seen", (
                        "Registered but never heard from since the collector started: not installed, powered "
                        "off, or configured with the wrong broker address or terminal id."
                    )),
                ),
            ),
        ),
    ),
    Condition(
        name="upload_backlog",
        kind="heartbeat",
        severity="critical",
        step="local_records",
        causes={
            "queue_depth": (
                "Transactions are piling up in the terminal's local queue: it cannot reach the acquirer's host "
                "(network path, host certificate, or host refusing the terminal)."
            ),
            "queue_age": (
                "A completed transaction has waited too long in the terminal's upload queue: uploads are stuck, "
                "so the acquirer cannot see these payments yet."
            ),
        },
        merchant=(
            (
                "Your terminal {tid} has payments it could not send yet (since {since}). Please keep it switched "
                "on and connected, and do not reset it; we are working on the connection to the payment "
                "institution."
            ),
            (
                "您的POS终端 {tid} 自 {since} 起有交易尚未上传。请保持终端开机联网，不要重置终端；"
                "我们正在处理与支付机构的连接问题。"
            ),
        ),
        alerts=(
            Alert(
                name="PosTerminalUploadBacklog",
                severity="critical",
                summary="POS terminal cannot upload its transactions.",
                what=(
                    "has completed transactions waiting in its local upload queue{{ with $detail }} ({{ . }}){{ "
                    "end }}. The acquirer cannot see these payments yet and the merchant will find them missing."
                ),
                cause=(
                    "The terminal cannot reach the acquirer's host: network path, host certificate, or the host "
                    "refusing the terminal."
                ),
                causes=(
                    ("queue_depth", (
                        "Transactions are piling up in the local queue: the terminal cannot reach the acquirer's "
                        "host (network path, host certificate, or the host refusing the terminal)."
                    )),
                    ("queue_age", (
                        "A completed transaction has waited too long in the upload queue: uploads are stuck "
                        "(network path to the host, or the host rejecting uploads)."
                    )),
                ),
            ),
        ),
    ),
    Condition(
        name="upstream_missing",
        kind="time",
        severity="critical",
        step="acquirer_records",
        causes={
            "": (
                "The terminal reports uploads acknowledged by the host, but the acquirer's records contain none "
                "of them: the host is dropping or mis-filing this terminal's transactions (registration, "
                "permissions or routing on the acquirer's side)."
            ),
        },
        merchant=(
            (
                "Your terminal {tid} sent its payments, but the payment institution has not recorded them (since "
                "{since}). We have reported this to them; you do not need to do anything or repeat payments."
            ),
            (
                "您的POS终端 {tid} 已上传交易，但支付机构自 {since} 起未入账。我们已向支付机构报告，您无需操作，"
                "也请勿重复收款。"
            ),
        ),
        alerts=(
            Alert(
                name="PosTerminalUpstreamMissing",
                severity="critical",
                summary="Acquirer has no record of transactions the POS terminal says were acknowledged.",
                what=(
                    "reports transactions acknowledged by the host, but the feed of acquirer {{ $labels.acquirer "
                    "}} recorded none of them within the grace period. The merchant's payments cannot be found "
                    "on the acquirer's side."
                ),
                cause=(
                    "The host is dropping or mis-filing this terminal's transactions: merchant or terminal "
                    "registration, permissions or routing on the acquirer's side, or the acquirer's processing "
                    "is delayed by maintenance."
                ),
            ),
        ),
    ),
    Condition(
        name="unregistered",
        kind="heartbeat",
        severity="warning",
        step="registration",
        causes={
            "": (
                "Heartbeats from a terminal id the registry does not know: a new or swapped device not "
                "registered with the acquirer, whose transactions cannot be attributed to a merchant."
            ),
        },
        merchant=(
            (
                "Your terminal {tid} is not registered with the payment institution yet, so its payments cannot "
                "be found under your shop. We are registering it."
            ),
            "您的POS终端 {tid} 尚未在支付机构登记，因此交易无法在您的商户下查到。我们正在为其办理登记。",
        ),
        alerts=(
            Alert(
                name="PosTerminalUnregistered",
                severity="warning",
                summary="Unregistered POS terminal is sending heartbeats.",
                what=(
                    "sends heartbeats but is not in the terminal registry. Its transactions cannot be attributed "
                    "to a registered merchant."
                ),
                cause=(
                    "A new or swapped device that was never registered with the acquirer, or a typo in its "
                    "terminal id."
                ),
            ),
        ),
    ),
    Condition(
        name="merchant_mismatch",
        kind="heartbeat",
        severity="critical",
        step="registration",
        causes={
            "": (
                "The terminal is configured with a different merchant id than the acquirer has on record: its "
                "transactions are booked to the wrong merchant or refused."
            ),
        },
        merchant=(
            (
                "Your terminal {tid} is set up with a different merchant number than the one registered, so "
                "payments are filed under the wrong merchant. We will correct its settings; please keep it "
                "switched on."
            ),
            (
                "您的POS终端 {tid} 设置的商户号与登记的不一致，交易被记到了其他商户下。我们会更正终端设置，"
                "请保持终端开机。"
            ),
        ),
        alerts=(
            Alert(
                name="PosTerminalMerchantMismatch",
                severity="critical",
                summary="POS terminal is configured for a different merchant than registered.",
                what=(
                    "reports merchant id{{ with $detail }} {{ . }}{{ end }}, which differs from the registry's "
                    "merchant {{ $labels.merchant_id }}. Its payments are booked to the wrong merchant or "
                    "refused by the host."
                ),
                cause=(
                    "The terminal was moved between merchants or re-parameterised without updating the "
                    "registration; or the registry is out of date."
                ),
            ),
        ),
    ),
    Condition(
        name="outdated_software",
        kind="heartbeat",
        severity="warning",
        step="software",
        causes={
            "": (
                "The payment application is older than the acquirer's minimum version: the host may refuse or "
                "mishandle its uploads."
            ),
        },
        merchant=(
            (
                "Your terminal {tid} needs a software update. Please keep it switched on and connected so the "
                "update can install; we will confirm when it is done."
            ),
            "您的POS终端 {tid} 需要更新软件。请保持终端开机联网以便完成更新，完成后我们会通知您。",
        ),
        alerts=(
            Alert(
                name="PosTerminalOutdatedSoftware",
                severity="warning",
                summary="POS terminal runs outdated payment software.",
                what=(
                    "runs a payment application older than the minimum version required for model {{ "
                    "$labels.model }}."
                ),
                cause=(
                    "The terminal missed a software update (offline during the rollout, update failed, or "
                    "updates disabled); the host may refuse or mishandle its uploads."
                ),
            ),
        ),
    ),
    Condition(
        name="hardware_fault",
        kind="heartbeat",
        severity="critical",
        step="hardware",
        causes={
            "printer_paper_out": (
                "The printer is out of paper: payments still go through but receipts do not print, and staff may "
                "void or repeat transactions."
            ),
        },
        merchant=(
            (
                "Your terminal {tid} reports a hardware fault since {since}. We have filed a repair request; "
                "please use another terminal for now."
            ),
            "您的POS终端 {tid} 自 {since} 起报告硬件故障。我们已申报维修，请暂时使用其他终端收款。",
        ),
        alerts=(
            Alert(
                name="PosTerminalHardwareFault",
                severity="critical",
                summary="POS terminal reports a hardware fault.",
                what=(
                    "reports a hardware fault{{ with $detail }} ({{ . }}){{ end }}. It cannot complete or record "
                    "payments reliably."
                ),
                cause=(
                    "A printer, display or card reader fault reported by the terminal: the device needs repair "
                    "or replacement."
                ),
                severity_matcher='severity="critical"',
            ),
            Alert(
                name="PosTerminalHardwareFault",
                severity="warning",
                summary="POS terminal reports a hardware fault.",
                what=(
                    "reports a hardware fault{{ with $detail }} ({{ . }}){{ end }}. Payments still go through "
                    "but receipts do not print."
                ),
                cause=(
                    "The printer is out of paper or its cover is open: staff may void or repeat payments without "
                    "a receipt."
                ),
                severity_matcher='severity!="critical"',
            ),
        ),
    ),
    Condition(
        name="weak_signal",
        kind="heartbeat",
        severity="warning",
        step="network_power",
        causes={
            "": "The network signal has stayed weak: uploads time out and transactions queue up.",
        },
        merchant=(
            (
                "The network signal at terminal {tid} is weak, so payments may be sent late. Please move it "
                "closer to the router or use a cable if you can."
            ),
            "终端 {tid} 网络信号弱，交易可能延迟上传。请将终端移近路由器，或尽量使用有线网络。",
        ),
        alerts=(
            Alert(
                name="PosTerminalWeakSignal",
                severity="warning",
                summary="POS terminal has a weak network signal.",
                what=(
                    "has reported a weak network signal for a sustained period{{ with $detail }} ({{ . }}){{ end "
                    "}}. Uploads time out and transactions start to queue."
                ),
                cause=(
                    "The terminal sits in a coverage dead spot, its antenna or SIM is failing, or the shop's "
                    "Wi-Fi is congested or too far away."
                ),
            ),
        ),
    ),
    Condition(
        name="clock_skew",
        kind="heartbeat",
        severity="warning",
        step="software",
        causes={
            "": (
                "The terminal's clock is far from real time: host-side checks can reject its uploads and its "
                "records appear at the wrong time."
            ),
        },
        merchant=(
            (
                "The clock of your terminal {tid} is wrong, so payments show at the wrong time. We will correct "
                "it; please restart the terminal when asked."
            ),
            "您的POS终端 {tid} 时间不准确，交易显示的时间有误。我们会进行校正，请按提示重启终端。",
        ),
        alerts=(
            Alert(
                name="PosTerminalClockSkew",
                severity="warning",
                summary="POS terminal clock is wrong.",
                what=(
                    "has a clock that differs from real time by more than the collector allows{{ with $detail }} "
                    "(terminal is {{ . }}){{ end }}. Host-side checks can reject its uploads and its records "
                    "appear at the wrong time."
                ),
                cause=(
                    "The terminal's time sync failed (no NTP or host time sync after a reboot, a drained clock "
                    "battery)."
                ),
            ),
        ),
    ),
    Condition(
        name="flapping",
        kind="time",
        severity="warning",
        step="network_power",
        causes={
            "": (
                "The terminal keeps rebooting or reconnecting: unstable power supply, failing battery or "
                "intermittent network."
            ),
        },
        merchant=(
            "Your terminal {tid} keeps restarting. Please check the charger, power socket and battery.",
            "您的POS终端 {tid} 频繁重启。请检查充电器、电源插座和电池。",
        ),
        alerts=(
            Alert(
                name="PosTerminalFlapping",
                severity="warning",
                summary="POS terminal keeps rebooting or reconnecting.",
                what=(
                    "has rebooted or gone offline and back several times within the collector's flapping window. "
                    "Payments fail intermittently."
                ),
                cause="An unstable power supply or failing battery, or an intermittent network link.",
            ),
        ),
    ),
    Condition(
        name="messages_rejected",
        kind="time",
        severity="warning",
        step="software",
        causes={
            "": (
                "The terminal is alive, but the collector rejects its messages (the reason is the detail): its "
                "firmware sends something protocol v1 does not allow, so its health cannot be judged."
            ),
            "card_data": (
                "The terminal is alive, but its messages are rejected because they appear to contain a card "
                "number: a firmware or configuration fault that must be fixed (PCI), not a network problem."
            ),
            "counter_backwards": (
                "The terminal is alive, but its transaction counters went backwards (reset or replaced device "
                "under the same id), so its heartbeats are rejected."
            ),
        },
        merchant=(
            (
                "Your terminal {tid} is switched on, but since {since} our monitoring cannot read the status "
                "reports it sends. This alone does not stop payments; we are working with the terminal's vendor "
                "to fix it."
            ),
            (
                "您的POS终端 {tid} 已开机，但自 {since} 起我们的监控系统无法读取它发送的状态报告。"
                "这本身不影响收款；我们正在与终端厂商一起处理。"
            ),
        ),
        alerts=(
            Alert(
                name="PosTerminalMessagesRejected",
                severity="warning",
                summary="POS terminal is alive but the collector rejects its messages.",
                what=(
                    "keeps sending messages, but the collector rejects them{{ with $detail }} ({{ . }}){{ end "
                    "}}, so no accepted heartbeat arrived for its offline period. It is not offline, but its "
                    "health (upload queue, hardware, software) cannot be judged."
                ),
                cause=(
                    "The terminal's firmware or configuration sends messages that protocol v1 does not allow (a "
                    "new firmware version, a changed field type or unit)."
                ),
                causes=(
                    ("card_data", (
                        "Its messages appear to contain a card number: a firmware or configuration fault and a "
                        "PCI matter. The rejected content was not stored or logged."
                    )),
                    ("counter_backwards", (
                        "Its transaction counters went backwards: the device was reset or replaced under the "
                        "same terminal id."
                    )),
                ),
            ),
        ),
    ),
    Condition(
        name="activity_drop",
        kind="baseline",
        severity="warning",
        step="local_records",
        causes={
            "": (
                "The terminal is online and reports nothing wrong, but it has recorded no transaction for a "
                "stretch in which its learned activity made silence very unlikely: a card reader or payment app "
                "that hangs without reporting a fault, an app declining everything, or the merchant taking "
                "payments on another device."
            ),
        },
        merchant=(
            (
                "Your terminal {tid} is switched on and connected, but it has recorded no payment since {since}, "
                "when it usually does. If customers cannot pay with it, please restart it and tell us; if you "
                "are closed today or use another terminal, you can ignore this message."
            ),
            (
                "您的POS终端 {tid} 已开机联网，但自 {since} 起没有任何交易记录，而平时此时段通常有交易。"
                "如顾客无法用它付款，请重启终端并联系我们；如今天休息或在使用其他终端，请忽略此消息。"
            ),
        ),
        alerts=(
            Alert(
                name="PosTerminalActivityDrop",
                severity="warning",
                summary="POS terminal has stopped recording transactions while it looks healthy.",
                what=(
                    "is online and reports no fault, but has recorded no transaction where its learned activity "
                    "made that very unlikely{{ with $detail }} ({{ . }}){{ end }}. Its payments have probably "
                    "stopped."
                ),
                cause=(
                    "A card reader or payment application that hangs or declines everything without reporting a "
                    "fault, or the merchant moved to another terminal. Call the merchant and ask for a test "
                    "payment."
                ),
            ),
        ),
    ),
)

_FINDINGS: Final = (
    Finding(
        name="acquirer_maintenance",
        step="acquirer_host",
        cause=(
            "The acquirer's host publishes no records (maintenance or outage): transactions are held on the "
            "acquirer's side and appear when its feed resumes."
        ),
        merchant=(
            (
                "Your terminal {tid} is working. The payment institution's system is in maintenance since "
                "{since}, so recent payments show up later. Please do not repeat payments; they will appear when "
                "maintenance ends."
            ),
            (
                "您的POS终端 {tid} 工作正常。支付机构系统自 {since} 起维护中，近期交易会延迟显示。请勿重复收款，"
                "维护结束后交易即可查到。"
            ),
        ),
    ),
    Finding(
        name="unrecorded_transactions",
        step="acquirer_records",
        cause=(
            "Some transactions the terminal completed are not in the acquirer's records after the grace period: "
            "the host dropped or mis-filed them."
        ),
        merchant=(
            (
                "Some payments from terminal {tid} (since {since}) are not yet in the payment institution's "
                "records. We have sent them the list; you do not need to repeat these payments."
            ),
            (
                "终端 {tid} 自 {since} 起的部分交易尚未出现在支付机构的记录中。我们已将交易清单发送给支付机构，"
                "请勿重复收款。"
            ),
        ),
    ),
    Finding(
        name="acquirer_feed_unknown",
        step="acquirer_host",
        cause=(
            "Nothing has been received from the acquirer's feed yet: whether transactions reach the acquirer "
            "cannot be verified."
        ),
        merchant=(
            (
                "Your terminal {tid} is working. We cannot confirm yet that the payment institution received its "
                "payments; we are checking."
            ),
            "您的POS终端 {tid} 工作正常。我们暂时无法确认支付机构是否已收到交易，正在核查。",
        ),
    ),
    Finding(
        name="acquirer_volume_drop",
        step="acquirer_records",
        cause=(
            "The acquirer's feed still arrives but records far fewer transactions than usual for this hour: its "
            "host is failing (declining or losing transactions) before its feed stops."
        ),
        merchant=(
            (
                "Your terminal {tid} is working, but the payment institution has been recording far fewer "
                "payments than usual since {since}. We have reported it to them; if a payment is declined, please "
                "ask the customer to wait a few minutes and try again rather than repeat it."
            ),
            (
                "您的POS终端 {tid} 工作正常，但支付机构自 {since} 起记录的交易远少于平时。我们已向其报告；"
                "如有交易被拒，请让顾客稍候再试，不要重复收款。"
            ),
        ),
    ),
    Finding(
        name="shutdown",
        step="network_power",
        cause="The terminal was switched off cleanly (not a fault): it takes no payments until switched on.",
    ),
    Finding(
        name="paper_out",
        step="hardware",
        merchant=(
            (
                "Your terminal {tid} is out of receipt paper. Please load a new roll; payments still go through "
                "and receipts can be reprinted from the transaction list."
            ),
            "您的POS终端 {tid} 打印纸用完了。请装入新纸卷；交易不受影响，可从交易记录中补打小票。",
        ),
    ),
)

CATALOGUE: Final[Mapping[str, Condition]] = {c.name: c for c in _CONDITIONS}
FINDINGS: Final[Mapping[str, Finding]] = {f.name: f for f in _FINDINGS}

# Most explanatory first: the primary cause of a diagnosis is the highest-ranked finding. Offline: nothing
# leaves the terminal. Maintenance: the acquirer publishes no records for anyone, so every other acquirer-side
# finding is unverifiable. Backlog: the terminal holds the payments. Then the acquirer holding or misfiling what
# it received; then messages_rejected — the terminal is alive but its reports are refused, so nothing it says
# can be checked (queue, hardware, software) and it comes before every finding that rests on its reports; then
# reasons the host may refuse or misplace uploads, then faults that contribute (signal, flapping) or only hide
# receipts (paper).
RANK: Final = (
    "offline",
    "acquirer_maintenance",
    "upload_backlog",
    "upstream_missing",
    "unrecorded_transactions",
    "acquirer_volume_drop",
    "messages_rejected",
    "merchant_mismatch",
    "unregistered",
    "outdated_software",
    "clock_skew",
    "hardware_fault",
    "weak_signal",
    "flapping",
    "activity_drop",
    "paper_out",
    "acquirer_feed_unknown",
)


def step_of(code: str) -> str:
    """The checklist step of a condition or finding."""
    entry = CATALOGUE.get(code) or FINDINGS[code]
    return entry.step


def critical_conditions() -> tuple[str, ...]:
    """Conditions that are critical when active, in catalogue order (what the dashboards count as down)."""
    return tuple(c.name for c in _CONDITIONS if c.severity == "critical")
