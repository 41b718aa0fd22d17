// Minimal stand-ins of the framework contracts the adapters are written against (React,
// Vue and Svelte are not installed here). Each keeps only what its documentation promises:
// enough to mount, update and unmount, and no more. Not a test file (node --test runs it
// too, as a file with no tests).

const sameDeps = (a, b) => a !== null && a.length === b.length && a.every((x, i) => Object.is(x, b[i]));

/**
 * React's hook contract for one component: `useMemo(factory, deps)` recomputes when a dep
 * changes (Object.is); `useSyncExternalStore(subscribe, getSnapshot)` returns the snapshot,
 * subscribes after the render is committed, re-renders when `getSnapshot()` changes, and
 * unsubscribes on unmount or when it is given another `subscribe`.
 * `render(component, props)` → {current, props, renders, rerender(props), unmount()}.
 */
export function reactStandIn() {
  /** @type {any} */
  let instance = null;

  const slot = (init) => {
    const i = instance.cursor++;
    if (instance.slots.length <= i) instance.slots.push(init());
    return instance.slots[i];
  };

  const React = {
    useMemo(factory, deps) {
      const s = slot(() => ({ deps: null, value: undefined }));
      if (!sameDeps(s.deps, deps)) {
        s.deps = deps;
        s.value = factory();
      }
      return s.value;
    },
    useSyncExternalStore(subscribe, getSnapshot) {
      const s = slot(() => ({ subscribe: null, unsubscribe: null, getSnapshot, rendered: undefined }));
      s.getSnapshot = getSnapshot;
      s.rendered = getSnapshot();
      instance.effects.push(s);
      s.next = subscribe;
      return s.rendered;
    },
  };

  function render(component, props) {
    const inst = {
      slots: [],
      cursor: 0,
      effects: [],
      props,
      current: undefined,
      renders: 0,
      mounted: true,
      dirty: false,
      committing: false,
    };
    const run = () => {
      let passes = 0;
      do {
        // React gives up likewise: a store that changes at every render never settles.
        if (++passes > 25) throw new Error("Too many re-renders");
        inst.dirty = false;
        instance = inst;
        inst.cursor = 0;
        inst.effects = [];
        inst.current = component(inst.props);
        inst.renders++;
        instance = null;
        // commit: (re)subscribe the stores whose subscribe function changed
        inst.committing = true;
        for (const s of inst.effects) {
          if (s.subscribe === s.next) continue;
          s.unsubscribe?.();
          s.subscribe = s.next;
          s.unsubscribe = s.subscribe(() => {
            if (!inst.mounted || Object.is(s.getSnapshot(), s.rendered)) return;
            if (inst.committing) inst.dirty = true;
            else run();
          });
        }
        inst.committing = false;
      } while (inst.dirty && inst.mounted);
    };
    run();
    return {
      get current() {
        return inst.current;
      },
      get renders() {
        return inst.renders;
      },
      rerender(next) {
        inst.props = next;
        run();
      },
      unmount() {
        inst.mounted = false;
        for (const s of inst.slots) s.unsubscribe?.();
      },
    };
  }

  return { React, render };
}

/**
 * Vue's contract as the adapter uses it: `shallowRef(v)` (`.value`, counted writes),
 * `effectScope()` → {run(fn), stop()}, and `onScopeDispose(fn)`, which runs `fn` when the
 * active scope stops (a component's scope stops when it unmounts). Like Vue, it warns
 * (here: throws) when there is no active scope.
 */
export function vueStandIn() {
  /** @type {{cleanups: Function[]} | null} */
  let active = null;
  const Vue = {
    shallowRef(value) {
      return {
        writes: 0,
        _v: value,
        get value() {
          return this._v;
        },
        set value(v) {
          this.writes++;
          this._v = v;
        },
      };
    },
    onScopeDispose(fn) {
      if (!active) throw new Error("onScopeDispose() is called when there is no active effect scope");
      active.cleanups.push(fn);
    },
  };
  function effectScope() {
    const scope = { cleanups: [] };
    return {
      run(fn) {
        const previous = active;
        active = scope;
        try {
          return fn();
        } finally {
          active = previous;
        }
      },
      stop() {
        for (const fn of scope.cleanups.splice(0)) fn();
      },
    };
  }
  return { Vue, effectScope };
}

/**
 * Play the gateway's answer to a kv_sub: `ok`, one `kv_msg` put per entry (revisions 1…n),
 * then `synced`.
 * @param {any} ws a FakeSocket (fakes.mjs)
 * @param {any} req the kv_sub envelope the client sent
 * @param {Record<string, any>} values key → value
 */
export function answerKv(ws, req, values) {
  const entries = Object.entries(values);
  ws.frame(
    { op: "ok", inbox: req.inbox, target: req.target, data: { position: 1, recovered: false } },
    ...entries.map(([key, value], i) => ({ op: "kv_msg", target: req.target, data: { key, op: "put", revision: i + 1, value } })),
    { op: "kv_msg", target: req.target, inbox: req.inbox, data: { op: "synced", revision: entries.length } },
  );
}
