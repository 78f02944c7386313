"""What a compiled program says about itself: memory per device, XLA's counts, collectives
and the fusions that move the most bytes.

`memory_analysis()` and `cost_analysis()` are XLA's own; the collectives and fusions are
read from the optimized HLO text (`compiled.as_text()`), where each executed instruction
(in the entry computation and the bodies of its loops, not inside a fused computation) is
`%name = <shape> <opcode>(%operand, ...)`. A fusion's bytes are its operands' and result's
logical sizes (the tiles' padding not counted), once per appearance in the program: a
loop body's fusions are listed once, however many iterations run.
"""

import collections
import dataclasses
import math
import re

_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
          "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\](\{[^}]*\})?")  # dtype, dims, layout
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_CALLED = re.compile(r"\b(?:calls|to_apply)=%([\w.\-]+)")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
# Executed instructions that name or pass buffers and move none themselves.
_NOT_KERNELS = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
                "call", "after-all", "partition-id", "replica-id")


def shape_bytes(shape: str) -> float:
  """Bytes of every array in an HLO shape string (a tuple adds its elements)."""
  return sum(size for size, _ in _arrays(shape))


def _arrays(shape: str) -> list[tuple[float, bool]]:
  """(bytes, in HBM) of each array of an HLO shape, in order. A TPU layout names the memory
  space of a buffer that memory-space assignment moved out of HBM (`S(1)`: on-chip memory;
  `S(2)`, `S(6)`: sync flags and scalars); HBM is memory space 0, a layout without one."""
  return [(_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d), "S(" not in layout)
          for dtype, dims, layout in _ARRAY.findall(shape)]


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  shape: str
  opcode: str
  operands: tuple[str, ...]
  attributes: str
  args: str = ""          # the text between the opcode's parentheses

  @property
  def label(self) -> str:
    """What the instruction computes: the JAX operation it came from, else its opcode."""
    found = re.search(r'op_name="([^"]*)"', self.attributes)
    return found.group(1) if found else self.opcode


def _computations(hlo_text: str) -> tuple[dict[str, list[Instruction]], set[str]]:
  """Every computation's instructions, and the names of those a fusion or reduction calls."""
  computations: dict[str, list[Instruction]] = {}
  called: set[str] = set()
  current = None
  for line in hlo_text.splitlines():
    if line and not line.startswith(" ") and line.rstrip().endswith("{"):
      head = line.split()
      current = (head[1] if head[0] == "ENTRY" else head[0]).lstrip("%")
      computations[current] = []
      continue
    found = _INSTRUCTION.match(line)
    if found and current is not None:
      name, shape, opcode, rest = found.groups()
      args, _, attributes = rest.partition(")")
      computations[current].append(Instruction(name, shape, opcode, tuple(re.findall(r"%([\w.\-]+)", args)),
                                               attributes, args))
      called.update(_CALLED.findall(attributes))
  return computations, called


def executed(hlo_text: str) -> list[Instruction]:
  """The instructions that run as kernels: those of every computation that no fusion or
  reduction calls (the entry computation, loop bodies and conditions)."""
  return _executed(*_computations(hlo_text))


def _executed(computations: dict[str, list[Instruction]], called: set[str]) -> list[Instruction]:
  return [i for name, body in computations.items() if name not in called for i in body]


def loops(hlo_text: str) -> list[int]:
  """The trip count of each while loop in the program (0 where it is not a constant): the
  bound its condition compares with. XLA's cost analysis counts a loop's body once."""
  return _loops(_computations(hlo_text)[0])


def _loops(computations: dict[str, list[Instruction]]) -> list[int]:
  found = []
  for body in computations.values():
    for i in body:
      if i.opcode != "while":
        continue
      condition = re.search(r"condition=%([\w.\-]+)", i.attributes)
      bounds = [int(j.args) for j in computations.get(condition.group(1) if condition else "", [])
                if j.opcode == "constant" and j.args.lstrip("-").isdigit()]
      found.append(bounds[0] if bounds else 0)
  return found


def collectives(instructions: list[Instruction]) -> dict[str, int]:
  """How many of each collective the program runs (async start/done pairs count once)."""
  counts = collections.Counter()
  for i in instructions:
    kind = i.opcode.removesuffix("-start")
    if kind in COLLECTIVES and not i.opcode.endswith("-done"):
      counts[kind] += 1
  return dict(sorted(counts.items()))


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def out_of_memory(message: str) -> dict | None:
  """What the TPU compiler's refusal says: {"temporaries": bytes it needs, "available": bytes
  of HBM it has for them}, or None for any other error. A program that does not fit does not
  compile. The refusal comes in two forms: "the total memory required for HLO temporaries (N)
  exceeds available HBM (M)", or, when the temporaries alone fit but not beside the rest,
  "Used U of C hbm" with the program's "HLO temp N" below it (the room is then C - (U - N))."""
  number = lambda value, unit: float(value) * _UNITS[unit]
  found = re.search(r"Ran out of memory.*?HLO temporaries \(([\d.]+)([KMGT])\).*?available HBM "
                    r"\(([\d.]+)([KMGT])\)", message, flags=re.S)
  if found is not None:
    need, need_unit, have, have_unit = found.groups()
    return {"temporaries": number(need, need_unit), "available": number(have, have_unit)}
  found = re.search(r"Ran out of memory in memory space hbm\. Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm"
                    r".*?HLO temp\s+([\d.]+)([KMGT])", message, flags=re.S)
  if found is None:
    return None
  used, capacity, need = (number(*found.groups()[i:i + 2]) for i in (0, 2, 4))
  return {"temporaries": need, "available": capacity - (used - need)}


def _moved(instructions: list[Instruction]):
  """Bytes an instruction moves: its result's and its operands' logical sizes."""
  shapes = {i.name: i.shape for i in instructions}
  return lambda i: shape_bytes(i.shape) + sum(shape_bytes(shapes.get(o, "")) for o in i.operands)


def undeclared_kernel_bytes(instructions: list[Instruction]) -> float:
  """Bytes of the Pallas (Mosaic) kernels that declare no cost: XLA counts none of their
  traffic, so each is taken to read its operands and write its results once (a flash
  kernel's blocks are read once). Kernels with a `pl.CostEstimate` are in XLA's count."""
  moved = _moved(instructions)
  return sum(moved(i) for i in instructions
             if i.opcode == "custom-call" and "tpu_custom_call" in i.attributes
             and "cost_estimate" not in i.attributes)


def hbm_traffic(instructions: list[Instruction]) -> float:
  """Bytes the program moves to and from HBM: each kernel's operands and result that live in
  HBM (memory space 0), and each async copy's or slice's bytes once per end in HBM (a
  prefetch reads HBM once, an eviction writes it once).

  XLA's `bytes accessed` counts every operand and result alike, wherever memory-space
  assignment put it, so on a TPU it adds the traffic of the buffers it keeps on chip (most of
  a step's, at HBM's price) and its bytes over HBM bandwidth overstate the time the step
  needs for memory. This count keeps HBM's traffic only, so bytes / bandwidth bounds that
  time: logical sizes, a kernel that reads part of an operand counted whole, on-chip traffic
  and the tiles' padding not counted.
  """
  shapes = {i.name: i.shape for i in instructions}
  moved = 0.0
  for i in instructions:
    if i.opcode in _NOT_KERNELS or i.opcode.endswith("-done"):
      continue
    result = _arrays(i.shape)
    if i.opcode in ("copy-start", "slice-start"):  # (destination, source, flag); ((source), slice, flag)
      destination, source = result[:2] if i.opcode == "copy-start" else result[1::-1]
      moved += destination[0] * (destination[1] + source[1])
      continue
    moved += sum(b for b, in_hbm in result + [a for o in i.operands for a in _arrays(shapes.get(o, ""))]
                 if in_hbm)
  return moved


def custom_calls(hlo_text: str) -> dict[str, int]:
  """Custom calls by target: `tpu_custom_call` is a Pallas (Mosaic) kernel."""
  return dict(collections.Counter(re.findall(r'custom_call_target="([\w.\-]+)"', hlo_text)))


def heaviest(instructions: list[Instruction], n: int = 10) -> list[dict]:
  """The `n` kernels (fusions, custom calls, copies, collectives...) that move the most bytes."""
  bytes_of = _moved(instructions)
  moved = []
  for i in instructions:
    if i.opcode in _NOT_KERNELS or i.opcode.endswith("-done"):
      continue
    moved.append({"bytes": bytes_of(i), "opcode": i.opcode, "shape": re.sub(r"\{[^}]*\}", "", i.shape),
                  "op": i.label})
  return sorted(moved, key=lambda m: -m["bytes"])[:n]


def analyse(compiled) -> dict:
  """Memory per device, XLA's FLOPs and bytes, collectives and the heaviest kernels of `compiled`."""
  memory = compiled.memory_analysis()
  text = compiled.as_text()
  computations, called = _computations(text)
  instructions = _executed(computations, called)
  outputs = memory.output_size_in_bytes - memory.alias_size_in_bytes  # donated buffers are reused
  return {
      "hbm": {"arguments": memory.argument_size_in_bytes, "temporaries": memory.temp_size_in_bytes,
              "outputs": outputs, "code": memory.generated_code_size_in_bytes,
              "total": memory.argument_size_in_bytes + memory.temp_size_in_bytes + outputs
              + memory.generated_code_size_in_bytes},
      **counts(compiled, instructions),
      "collectives": collectives(instructions),
      "loops": _loops(computations),
      "custom_calls": custom_calls(text),
      "heaviest": heaviest(instructions),
  }


def counts(compiled, instructions: list[Instruction] | None = None) -> dict:
  """XLA's FLOPs and bytes of `compiled`, the bytes of its kernels that declare none and its
  HBM traffic (`instructions`: its executed instructions, when already read)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  instructions = executed(compiled.as_text()) if instructions is None else instructions
  return {"xla_flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
          "kernel_bytes": undeclared_kernel_bytes(instructions), "hbm_traffic": hbm_traffic(instructions)}
