//! The global filter under autodiff: the op runs on the inner backend and records its analytic
//! backward, so every [`SpectralBackend`] trains through its own fast path.

use super::*;

#[derive(Debug)]
struct GlobalFilterBackward;

#[derive(Debug, Clone)]
struct GlobalFilterState {
    /// Checkpointed input, present when the weight needs a gradient.
    x: Option<NodeId>,
    /// Checkpointed weight, present when the input needs a gradient.
    weight: Option<NodeId>,
    layout: FilterLayout,
}

impl<B: SpectralBackend> Backward<B, 2> for GlobalFilterBackward {
    type State = GlobalFilterState;

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_w] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let state = ops.state;
        let x: Option<FloatTensor<B>> = state.x.map(|id| checkpointer.retrieve_node_output(id));
        let weight: Option<FloatTensor<B>> =
            state.weight.map(|id| checkpointer.retrieve_node_output(id));
        let (gx, gw) = B::global_filter_backward(grad, x, weight, state.layout);
        if let (Some(node), Some(g)) = (node_x, gx) {
            grads.register::<B>(node.id, g);
        }
        if let (Some(node), Some(g)) = (node_w, gw) {
            grads.register::<B>(node.id, g);
        }
    }
}

impl<B: SpectralBackend, C: CheckpointStrategy> SpectralBackend for Autodiff<B, C> {
    fn global_filter_forward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        layout: FilterLayout,
    ) -> FloatTensor<Self> {
        match GlobalFilterBackward
            .prepare::<C>([x.node.clone(), weight.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let x_needs_grad = !x.node.requirement.is_none();
                let w_needs_grad = !weight.node.requirement.is_none();
                let state = GlobalFilterState {
                    x: w_needs_grad.then(|| prep.checkpoint(&x)),
                    weight: x_needs_grad.then(|| prep.checkpoint(&weight)),
                    layout,
                };
                let out = B::global_filter_forward(x.primitive, weight.primitive, layout);
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::global_filter_forward(
                x.primitive,
                weight.primitive,
                layout,
            )),
        }
    }
}
